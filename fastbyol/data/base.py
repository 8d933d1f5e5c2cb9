"""The loader interface both data paths (torch DataLoader, DALI) implement.

A training loader yields :class:`TwoViewBatch` objects whose views are already augmented,
normalised float tensors on the training device, so the trainer never knows which path
produced them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


@dataclass
class TwoViewBatch:
    view1: torch.Tensor  # [B, 3, H, W] float, normalised, on the training device
    view2: torch.Tensor  # [B, 3, H, W]
    labels: torch.Tensor  # [B] int64 (-1 where unknown); used by nothing in training


class TwoViewLoader(Protocol):
    """What the trainer needs from a training data path.

    * ``len(loader)``: micro-batches per epoch for this rank (full batches only); the trainer
      takes ``dist.grad_accum`` of them per optimizer step.
    * ``set_epoch(epoch, start_micro_batch)``: the next ``iter`` yields epoch ``epoch`` from its
      micro-batch ``start_micro_batch`` on (exact resume); shuffling is a function of (seed, epoch).
    * ``skipped``: number of samples so far replaced by a stand-in because their file is
      unreadable (:mod:`~fastbyol.data.substitute`; counted, logged, never fatal). Batches are
      always full, so every rank runs the same number of equal-sized micro-batches.
    """

    batch_size: int  # per-rank micro-batch

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator[TwoViewBatch]: ...

    @property
    def skipped(self) -> int: ...
