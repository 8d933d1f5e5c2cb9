"""The torch data path: DataLoader workers decode and crop, the device does the rest.

Each worker item is one whole batch (a list of indices from a ``BatchSampler``). Workers
draw every random choice of both views for the batch (:func:`fastbyol.augment.draw_samples`,
each image's a function of ``(seed, epoch, index)``), cut the two uint8 crops (4× less host→device traffic than floats)
and return them with the draws; the photometric half runs batched on the training device
(:func:`fastbyol.augment.augment_pair`). When the training device *is* the CPU, the workers
run that half too, so it overlaps with compute instead of adding to every step. Since the
views are a function of ``(seed, epoch, index)`` alone, both placements give the same views,
an interrupted run resumed at step k sees exactly the batches it would have seen, the number
of ranks does not change them, and the DALI path makes the same choices.
"""
from __future__ import annotations

import io
import logging
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..augment import augment_pair, crop_pair, draw_samples
from ..config import AugmentConfig
from .base import TwoViewBatch
from .batching import EpochBatchLoader
from .image_source import ImageSource, read_encoded
from .substitute import SUBSTITUTED_MSG, NoReadableImage, Substitutes

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
    """Item: a batch's sample indices → ``(crops, labels, names of the substituted samples,
    (view 1 draws, view 2 draws))``, crops uint8 ``[B, 2, 3, S, S]``.

    An unreadable file is replaced by its stand-in (:class:`~fastbyol.data.substitute.Substitutes`:
    the next readable sample), cut with position ``i``'s draws, so batches never shrink. The
    draws are :func:`~fastbyol.augment.draw_samples`' for the whole batch at once.
    """

    def __init__(self, source: ImageSource, aug: AugmentConfig, seed: int):
        self.source, self.aug, self.seed, self.epoch = source, aug, seed, 0
        self.substitutes = Substitutes(len(source), lambda j: sample_name(source, j))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices):
        loaded = [self.substitutes.resolve(i, lambda k: open_rgb(self.source, k)) for i in indices]
        widths, heights = np.array([img.size for _, img in loaded]).reshape(-1, 2).T
        d1, d2 = draw_samples(np.asarray(indices), heights, widths, self.aug, self.seed, self.epoch)
        size = self.aug.image_size
        crops = np.stack([crop_pair(img, d1.boxes[k], d2.boxes[k], size) for k, (_, img) in enumerate(loaded)])
        labels = torch.as_tensor(self.source.labels[[j for j, _ in loaded]].astype(np.int64))
        bad = [sample_name(self.source, i) for i, (j, _) in zip(indices, loaded) if j != i]
        return torch.from_numpy(crops), labels, bad, (d1, d2)


def sample_name(src: ImageSource, i: int) -> str:
    return src.files[i] if src.files is not None else f"array[{i}]"


class TwoViewBatchDataset(Dataset):
    """Item: a batch's indices → ``(crops or (view1, view2), labels, bad files, draws)``.

    With ``augment_on`` set (a CPU device) the batch leaves fully augmented; otherwise as
    uint8 crops and their draws for the training device to finish.
    """

    def __init__(self, crops: TwoCropDataset, augment_on: Optional[torch.device],
                 out_dtype: torch.dtype, channels_last: bool):
        self.crops, self.augment_on = crops, augment_on
        self.out_dtype, self.channels_last = out_dtype, channels_last

    def __getitem__(self, indices):
        try:
            crops, labels, bad, draws = self.crops[indices]
        except NoReadableImage as e:  # re-raised by the main process: a one-line message, no worker traceback
            return None, None, str(e), None
        if self.augment_on is not None:
            crops, draws = augment_pair(crops, self.crops.aug, draws, self.out_dtype, self.channels_last), None
        return crops, labels, bad, draws


class TorchTwoViewLoader(EpochBatchLoader):
    """:class:`~fastbyol.data.base.TwoViewLoader` over a DataLoader.

    Args:
        source: the training images.
        aug: augmentation parameters (shared with the DALI path).
        batch_size: per-rank micro-batch.
        device: where views are produced (the training device).
        kernels: ``train.kernels``: the photometric half on ``device`` by the fused Triton
            kernel (``triton``, or ``auto`` on CUDA) or by the torch ops (``torch``).
    """

    def __init__(self, source: ImageSource, aug: AugmentConfig, batch_size: int, device: torch.device,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 2,
                 channels_last: bool = False, out_dtype: torch.dtype = torch.float32, kernels: str = "torch"):
        super().__init__(len(source), batch_size, device, seed, rank, world_size, workers)
        self.source, self.aug = source, aug
        self.channels_last, self.out_dtype, self.kernels = channels_last, out_dtype, kernels
        self.dataset = TwoCropDataset(source, aug, seed)
        self._skipped = 0
        self.bad_files: List[str] = []

    @property
    def skipped(self) -> int:
        return self._skipped

    def _loader(self) -> DataLoader:
        self.dataset.epoch = self.epoch
        in_workers = self.device.type == "cpu" and self.workers > 0
        items = TwoViewBatchDataset(self.dataset, self.device if in_workers else None,
                                    self.out_dtype, self.channels_last)
        return self.epoch_loader(items, prefetch_factor=4 if self.workers > 0 else None)

    def __iter__(self) -> Iterator[TwoViewBatch]:
        for crops, labels, bad, draws in self._loader():
            if crops is None:
                raise NoReadableImage(bad)
            if bad:
                self._note_bad(bad)
            if isinstance(crops, (tuple, list)):  # augmented in a worker
                yield TwoViewBatch(crops[0], crops[1], labels)
            else:
                v1, v2 = augment_pair(crops.to(self.device, non_blocking=True), self.aug, draws,
                                      self.out_dtype, self.channels_last, backend=self.kernels)
                yield TwoViewBatch(v1, v2, labels.to(self.device, non_blocking=True))

    def _note_bad(self, bad: List[str]) -> None:
        self._skipped += len(bad)
        self.bad_files.extend(bad[: max(0, 20 - len(self.bad_files))])
        log.warning(SUBSTITUTED_MSG, len(bad), self._skipped, bad[0])
