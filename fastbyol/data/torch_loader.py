"""The torch data path: DataLoader workers decode and crop, the device does the rest.

Each worker item is one whole batch (``(step, indices)`` from :class:`StepBatches`). Workers
return both views' uint8 crops (4× less host→device traffic than floats); the photometric
half of the augmentation runs batched on the training device
(:func:`fastbyol.augment.augment_pair`). When the training device *is* the CPU, the workers
run that half too, so it overlaps with compute instead of adding to every step. Every random
draw is a pure function of ``(seed, epoch, index)`` on the host and ``(seed, step, rank)``
for the batched half, so both placements give the same views, and an interrupted run resumed
at step k sees exactly the batches it would have seen.
"""
from __future__ import annotations

import io
import logging
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..augment import augment_pair, center_view, step_generator, two_crops
from ..config import AugmentConfig
from ..errors import FastByolError
from .base import TwoViewBatch
from .image_source import ImageSource, read_encoded

log = logging.getLogger("fastbyol.data")


def open_rgb(src: ImageSource, i: int):
    """Sample ``i`` as an RGB PIL image; ``None`` when the file cannot be decoded."""
    from PIL import Image

    if src.array is not None:
        return Image.fromarray(src.array[i])
    try:
        with Image.open(io.BytesIO(read_encoded(src, i))) as img:
            return img.convert("RGB")  # grayscale, CMYK, palette, RGBA → RGB; forces a full decode
    except Exception:  # corrupt, truncated, not an image: counted by the caller
        return None


class TwoCropDataset(Dataset):
    """Both views' random resized crops of sample ``i``: uint8 ``[2, 3, S, S]``.

    Unreadable files yield ``None`` (dropped by :func:`collate_crops` and counted).
    """

    def __init__(self, source: ImageSource, aug: AugmentConfig, seed: int):
        self.source, self.aug, self.seed, self.epoch = source, aug, seed, 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img = open_rgb(self.source, i)
        if img is None:
            return None, self.source.files[i] if self.source.files else str(i)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        return torch.from_numpy(two_crops(img, self.aug, rng)), int(self.source.labels[i])


def collate_crops(items):
    good = [(c, y) for c, y in items if c is not None]
    bad = [y for c, y in items if c is None]
    if not good:
        return None, None, bad
    return torch.stack([c for c, _ in good]), torch.tensor([y for _, y in good]), bad


class StepBatches(Sampler):
    """``(global step, indices)`` per batch of an :class:`EpochShardSampler`: one DataLoader
    item per batch, so whoever builds it knows which step's augmentation draws to use."""

    def __init__(self, sampler: "EpochShardSampler", first_step: int):
        self.sampler, self.first_step = sampler, first_step

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size

    def __iter__(self):
        idx, b = list(self.sampler), self.sampler.batch_size
        for k in range(len(idx) // b):
            yield self.first_step + k, idx[k * b:(k + 1) * b]


class TwoViewBatchDataset(Dataset):
    """Item ``(step, indices)`` → ``(crops or (view1, view2), labels, bad files)``.

    With ``augment_on`` set (a CPU device) the batch leaves fully augmented; otherwise as
    uint8 crops for the training device to finish.
    """

    def __init__(self, crops: TwoCropDataset, rank: int, augment_on: Optional[torch.device],
                 out_dtype: torch.dtype, channels_last: bool):
        self.crops, self.rank, self.augment_on = crops, rank, augment_on
        self.out_dtype, self.channels_last = out_dtype, channels_last

    def __getitem__(self, item):
        step, indices = item
        crops, labels, bad = collate_crops([self.crops[i] for i in indices])
        if crops is not None and self.augment_on is not None:
            crops = finish_views(crops, self.crops.aug, self.crops.seed, step, self.rank,
                                 self.out_dtype, self.channels_last)
        return crops, labels, bad


def finish_views(crops: torch.Tensor, aug: AugmentConfig, seed: int, step: int, rank: int,
                 out_dtype: torch.dtype, channels_last: bool):
    """The batched photometric half for one step, on the crops' device."""
    g = step_generator(crops.device, seed, step, rank)
    return augment_pair(crops, aug, g, out_dtype, channels_last)


class EpochShardSampler(Sampler[int]):
    """Shuffled indices for one rank, a pure function of (seed, epoch), starting at a sample
    offset (resume). Each rank takes a disjoint strided shard of one global permutation;
    the tail that does not fill a whole global batch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return (self.steps_per_epoch() * self.batch_size) - self.start

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng((self.seed, self.epoch, 0xB701)).permutation(self.n)
        used = perm[: self.steps_per_epoch() * self.batch_size * self.world_size]
        mine = used[self.rank:: self.world_size]
        return iter(mine[self.start:].tolist())


class TorchTwoViewLoader:
    """:class:`~fastbyol.data.base.TwoViewLoader` over a DataLoader.

    Args:
        source: the training images.
        aug: augmentation parameters (shared with the DALI path).
        batch_size: per-rank micro-batch.
        device: where views are produced (the training device).
    """

    def __init__(self, source: ImageSource, aug: AugmentConfig, batch_size: int, device: torch.device,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 2,
                 channels_last: bool = False, out_dtype: torch.dtype = torch.float32):
        if len(source) < batch_size * world_size:
            raise FastByolError(
                f"batch size {batch_size * world_size} is larger than the data set ({len(source)} images)")
        self.source, self.aug, self.batch_size, self.device = source, aug, batch_size, torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last, self.out_dtype = channels_last, out_dtype
        self.dataset = TwoCropDataset(source, aug, seed)
        self.sampler = EpochShardSampler(len(source), batch_size, seed, rank, world_size)
        self.workers = workers
        self.epoch, self.start_step = 0, 0
        self._skipped = 0
        self.bad_files: List[str] = []

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch()

    @property
    def skipped(self) -> int:
        return self._skipped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _loader(self) -> DataLoader:
        self.dataset.epoch = self.sampler.epoch = self.epoch
        self.sampler.start = self.start_step * self.batch_size
        batches = StepBatches(self.sampler, self.epoch * len(self) + self.start_step)
        in_workers = self.device.type == "cpu" and self.workers > 0
        items = TwoViewBatchDataset(self.dataset, self.rank, self.device if in_workers else None,
                                    self.out_dtype, self.channels_last)
        return DataLoader(
            items, batch_size=None, sampler=batches, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.workers > 0 else None,
        )

    def __iter__(self) -> Iterator[TwoViewBatch]:
        step = self.epoch * len(self) + self.start_step
        for crops, labels, bad in self._loader():
            if bad:
                self._note_bad(bad)
            if isinstance(crops, (tuple, list)):  # augmented in a worker
                yield TwoViewBatch(crops[0], crops[1], labels)
            elif crops is not None:
                v1, v2 = finish_views(crops.to(self.device, non_blocking=True), self.aug, self.seed, step,
                                      self.rank, self.out_dtype, self.channels_last)
                yield TwoViewBatch(v1, v2, labels.to(self.device, non_blocking=True))
            step += 1

    def _note_bad(self, bad: List[str]) -> None:
        self._skipped += len(bad)
        self.bad_files.extend(bad[: max(0, 20 - len(self.bad_files))])
        log.warning("skipped %d unreadable image(s) (%d so far), e.g. %s", len(bad), self._skipped, bad[0])


# ----------------------------------------------------------------------------- evaluation

class CenterViewDataset(Dataset):
    """Un-augmented evaluation view (resize + centre crop), uint8 ``[3, S, S]``."""

    def __init__(self, source: ImageSource, size: int):
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img = open_rgb(self.source, i)
        if img is None:
            return None, -1
        return torch.from_numpy(center_view(img, self.size)), int(self.source.labels[i])


def eval_loader(source: ImageSource, size: int, batch_size: int, workers: int,
                max_items: Optional[int] = None, seed: int = 0) -> DataLoader:
    """Batches of (uint8 images, labels) for kNN; unreadable files are dropped."""
    if max_items is not None and len(source) > max_items:
        idx = np.sort(np.random.default_rng(seed).choice(len(source), max_items, replace=False))
        source = source.subset(idx)
    return DataLoader(CenterViewDataset(source, size), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=collate_crops)
