"""Which samples each rank gets, batch by batch: one shuffled permutation per (seed, epoch), cut
into disjoint strided shards, full batches only, resumable mid-epoch. Every loader uses it (torch,
a user's Dataset, DALI's feeder), so all paths see the same order on any number of ranks.

Everything here counts micro-batches of one rank (``len(loader)``, ``set_epoch``'s start), never
optimizer steps: the trainer takes ``dist.grad_accum`` micro-batches per step.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..errors import FastByolError
from ..stop import ignore_stop_signals


class EpochShardSampler(Sampler[int]):
    """Shuffled indices for one rank, a pure function of (seed, epoch), starting at a sample
    offset (resume: ``start``, in samples). Each rank takes a disjoint strided shard of one global permutation;
    the tail that does not fill a whole global batch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def micro_batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return (self.micro_batches_per_epoch() * self.batch_size) - self.start

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng((self.seed, self.epoch, 0xB701)).permutation(self.n)
        used = perm[: self.micro_batches_per_epoch() * self.batch_size * self.world_size]
        mine = used[self.rank:: self.world_size]
        return iter(mine[self.start:].tolist())


class EpochBatchLoader:
    """What the torch-side loaders share: per-rank full batches in the order of
    :class:`EpochShardSampler` (a function of seed and epoch), resumable mid-epoch, through a
    DataLoader whose workers leave SIGTERM/Ctrl-C to the trainer (:mod:`fastbyol.stop`)."""

    def __init__(self, n_items: int, batch_size: int, device: torch.device, seed: int, rank: int,
                 world_size: int, workers: int):
        if n_items < batch_size * world_size:
            raise FastByolError(
                f"batch size {batch_size * world_size} is larger than the data set ({n_items} images)")
        self.batch_size, self.device, self.workers = batch_size, torch.device(device), workers
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampler = EpochShardSampler(n_items, batch_size, seed, rank, world_size)
        self.epoch, self.start_micro_batch = 0, 0

    def __len__(self) -> int:
        """Micro-batches per epoch (full batches only)."""
        return self.sampler.micro_batches_per_epoch()

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None:
        """The next ``iter`` yields epoch ``epoch`` from its micro-batch ``start_micro_batch`` on."""
        self.epoch, self.start_micro_batch = epoch, start_micro_batch

    def epoch_loader(self, items: Dataset, **options) -> DataLoader:
        """A DataLoader over ``items`` (indexed by a list of sample indices: one item per batch)
        for the current epoch, from micro-batch ``start_micro_batch``."""
        self.sampler.epoch, self.sampler.start = self.epoch, self.start_micro_batch * self.batch_size
        batches = BatchSampler(self.sampler, self.batch_size, drop_last=True)
        return DataLoader(items, batch_size=None, sampler=batches, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda",
                          worker_init_fn=ignore_stop_signals if self.workers > 0 else None, **options)
