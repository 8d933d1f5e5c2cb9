"""Evaluation views for frozen encoders (kNN monitor, ``fastbyol eval``), sharded per rank.

* the **centre view** (resize + centre crop, :func:`fastbyol.augment.center_view`): kNN, the
  probe's validation set and its precomputed-features mode;
* the **probe's training view** (the linear protocol's random resized crop + horizontal flip),
  drawn from the counter-based uniforms of ``(seed, epoch, index)`` (:mod:`fastbyol.counter_rng`,
  a stream of its own), so a view depends on the image alone,
  never on the number of ranks or the batch it falls in.

Every item carries its sample index, so features computed on several ranks can be put back
in the single-process order (:func:`fastbyol.eval.features.gather_rows`). Unreadable files are
dropped and counted.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..augment import CROP_TRIES, center_view, crop_boxes, crop_resize
from ..counter_rng import counter_uniforms
from .image_source import ImageSource
from .torch_loader import open_rgb

PROBE_STREAM = 0x11EA  # keys the probe's crops apart from the pretraining views'
PROBE_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, as the paper's linear protocol


class EvalViews(Dataset):
    """Sample ``i`` → ``(uint8 [3, S, S], label, i)``, or ``None`` when unreadable.

    ``crop_scale=None``: the centre view. Otherwise the probe's training view: random resized
    crop (area share in ``crop_scale``) and a flip with probability 1/2, set by ``epoch``.
    """

    def __init__(self, source: ImageSource, size: int, crop_scale: Optional[Tuple[float, float]] = None,
                 seed: int = 0):
        self.source, self.size, self.crop_scale, self.seed, self.epoch = source, size, crop_scale, seed, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img = open_rgb(self.source, i)
        if img is None:
            return None
        if self.crop_scale is None:
            view = center_view(img, self.size)
        else:
            # the crop tries' uniforms (4 each), then the flip's; a stream of its own (not the BYOL views')
            tries = 4 * CROP_TRIES
            u = counter_uniforms(self.seed ^ PROBE_STREAM, self.epoch, [i], tries + 1)
            width, height = img.size
            box = crop_boxes(u[:, :tries].reshape(1, CROP_TRIES, 4), [height], [width], self.crop_scale, PROBE_RATIO)[0]
            view = crop_resize(img, tuple(int(b) for b in box), self.size)
            if u[0, tries] < 0.5:
                view = np.ascontiguousarray(view[:, :, ::-1])
        return torch.from_numpy(view), int(self.source.labels[i]), i


def collate_views(items):
    """``(uint8 [n, 3, S, S] or None, labels [n], indices [n], unreadable count)``."""
    good = [it for it in items if it is not None]
    if not good:
        return None, None, None, len(items) - len(good)
    return (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]),
            torch.tensor([g[2] for g in good]), len(items) - len(good))


def cap_source(source: ImageSource, max_items: Optional[int], seed: int = 0) -> ImageSource:
    """A seeded random subset of at most ``max_items`` samples (the kNN bank cap), in order;
    the same on every rank."""
    if max_items is None or len(source) <= max_items:
        return source
    return source.subset(np.sort(np.random.default_rng(seed).choice(len(source), max_items, replace=False)))


def eval_loader(source: ImageSource, size: int, batch_size: int, workers: int, max_items: Optional[int] = None,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Centre views of this rank's strided shard (samples ``rank, rank + world, ...``) of
    ``source`` (capped at ``max_items``), in order."""
    source = cap_source(source, max_items, seed)
    mine = list(range(rank, len(source), world_size))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return DataLoader(EvalViews(source, size), batch_sampler=batches, num_workers=workers,
                      collate_fn=collate_views)


def global_batches(n: int, batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """One epoch's global batches of sample indices: a permutation seeded by ``(seed, epoch)``
    cut into ``ceil(n / batch_size)`` batches (the last one shorter)."""
    perm = np.random.default_rng((seed, epoch, 0x11EB)).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def probe_train_loader(source: ImageSource, size: int, batch_size: int, workers: int, crop_scale: Sequence[float],
                       seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The probe's training views of one epoch: for every global batch, this rank's strided
    share (possibly empty), so that the ranks' shares, gathered, are that global batch."""
    ds = EvalViews(source, size, tuple(crop_scale), seed)
    ds.epoch = epoch
    shares = [b[rank::world_size].tolist() for b in global_batches(len(source), batch_size, seed, epoch)]
    return DataLoader(ds, batch_sampler=shares, num_workers=workers, collate_fn=collate_views,
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
