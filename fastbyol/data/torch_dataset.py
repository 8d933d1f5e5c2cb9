"""A user's ``torch.utils.data.Dataset`` of images as a training data path.

Items may be image tensors ``[3, H, W]`` (float, or uint8 scaled to [0, 1]), PIL images, or
``(image, label, ...)`` tuples (the image is the first element). Batches are drawn by the
torch path's :class:`~fastbyol.data.batching.EpochShardSampler` (a function of
``(seed, epoch)``, sharded over ranks, full batches only), moved to the training device, and
turned into two views there by ``views(images, (seed, epoch, indices))``, image ``i``'s random
choices a function of ``(seed, epoch, i)``, so a resumed run sees the views it would have seen.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import FastByolError
from .base import TwoViewBatch
from .batching import EpochBatchLoader


def image_tensor(item) -> torch.Tensor:
    """One dataset item as a float ``[C, H, W]`` image tensor."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item.transpose(2, 0, 1) if item.ndim == 3 else item))
    elif not isinstance(item, torch.Tensor) and hasattr(item, "convert"):  # a PIL image
        item = torch.from_numpy(np.array(item.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())
    if not isinstance(item, torch.Tensor) or item.dim() != 3:
        shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
        raise FastByolError(f"dataset items must be [3, H, W] image tensors, PIL images or (image, ...) "
                            f"tuples; got {shape}")
    if not item.is_floating_point():
        item = item.float().div_(255.0)
    return item


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, indices):
        images = [image_tensor(self.dataset[i]) for i in indices]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise FastByolError(f"dataset images differ in size ({', '.join(map(str, sorted(shapes)[:3]))}): "
                                "resize them to one size in the Dataset")
        return torch.stack(images), torch.as_tensor(list(indices))


class DatasetTwoViewLoader(EpochBatchLoader):
    """:class:`~fastbyol.data.base.TwoViewLoader` over a user ``Dataset``.

    Args:
        dataset: any map-style dataset (``len`` and ``[i]``).
        views: ``views(images [B, 3, H, W] on device, (seed, epoch, indices)) -> (view1, view2)``.
        batch_size: per-rank micro-batch.
    """

    def __init__(self, dataset: Dataset, views: Callable, batch_size: int, device: torch.device,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0):
        super().__init__(len(dataset), batch_size, device, seed, rank, world_size, workers)
        self.dataset, self.views = dataset, views

    @property
    def skipped(self) -> int:
        return 0

    def __iter__(self) -> Iterator[TwoViewBatch]:
        for images, idx in self.epoch_loader(_Indexed(self.dataset)):
            images = images.to(self.device, non_blocking=True)
            v1, v2 = self.views(images, (self.seed, self.epoch, idx))
            yield TwoViewBatch(v1, v2, torch.full((len(idx),), -1, dtype=torch.int64, device=self.device))
