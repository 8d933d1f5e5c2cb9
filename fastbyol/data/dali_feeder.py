"""The DALI pipeline's external source: for each batch, the encoded bytes (or CIFAR pixels) and
every random parameter of both views, drawn on the host (:func:`fastbyol.augment.draw_samples`).

Sample order is :class:`~fastbyol.data.batching.EpochShardSampler`'s, as on the torch path; files are
read by a thread pool when they come from disk rather than the page cache, checked cheaply
(:func:`~fastbyol.data.image_check.check_encoded`), and an unreadable one is replaced by the next
readable sample (:mod:`~fastbyol.data.substitute`). Why the host draws: :mod:`fastbyol.data.dali`.
"""
from __future__ import annotations

import logging

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set

import numpy as np

from ..augment import draw_samples
from ..config import AugmentConfig
from .dali_params import dali_columns, view_columns
from .image_check import check_encoded
from .image_source import ImageSource, read_encoded
from .substitute import NoReadableImage, Substitutes
from .batching import EpochShardSampler
from .torch_loader import sample_name

log = logging.getLogger("fastbyol.data")

log = logging.getLogger("fastbyol.data")

SLOW_READ_S = 200e-6  # a file read slower than this (not from the page cache) goes to the read threads
_PROBE_READS = 4  # reads timed per batch to tell


def cores_per_rank() -> int:
    """The CPU cores this process may use, shared among the node's ranks (``LOCAL_WORLD_SIZE``
    from torchrun, ``LOCAL_SIZE`` from the DeepSpeed launcher): DALI's thread count by default."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, cores // max(1, local))





@dataclass
class FedBatch:
    micro_batch: int  # its number in the epoch
    indices: np.ndarray  # the samples fed (stand-ins in place of unreadable ones)
    bad: List[int]  # the batch's positions' samples that were replaced
    columns: Optional[List[list]]  # pipeline inputs; None when no sample of the data set is readable
    error: str = ""  # why columns is None


class TwoViewFeeder:
    """The pipeline's external source: batch ``k`` of epoch ``e`` for one rank.

    Called by DALI (``fn.external_source(source=feeder, batch=True)``) once per batch; raises
    ``StopIteration`` after the epoch's last full batch. Batches are prepared ``lookahead``
    micro-batches ahead on a background thread (the draws, the columns); when file reads are slow
    (a network file system), they and the header checks run on ``read_threads`` more threads,
    so the training thread rarely waits and ~1 ms reads overlap (``python -m fastbyol.bench.feeder``).
    """

    def __init__(self, source: ImageSource, aug: AugmentConfig, batch_size: int, seed: int, rank: int,
                 world_size: int, lookahead: int = 3, read_threads: int = 16):
        self.source, self.aug, self.batch_size, self.seed = source, aug, batch_size, seed
        self.sampler = EpochShardSampler(len(source), batch_size, seed, rank, world_size)
        self.lookahead = lookahead
        self.substitutes = Substitutes(len(source), self.path)
        self.known_bad: Set[int] = self.substitutes.bad  # unreadable, or rejected by DALI's decoder
        self.error = ""  # set when no sample can be read; the loader raises it
        self.epoch, self.next_micro_batch, self.order = 0, 0, np.zeros(0, np.int64)
        self.reported_upto = -1  # last micro-batch whose bad files were reported
        self.in_flight: List[FedBatch] = []  # fed to DALI, not yet consumed, oldest first
        self.on_bad: Callable[[List[int]], None] = lambda bad: None
        self.read_threads = read_threads
        self.read: Callable[[ImageSource, int], bytes] = read_encoded  # swappable (the benchmark's slow reader)
        self._pool: Optional[ThreadPoolExecutor] = None  # prepares batches ahead, in order
        self._readers: Optional[ThreadPoolExecutor] = None  # reads files for the batch being prepared
        self._pending: Dict[int, Future] = {}

    def micro_batches_per_epoch(self) -> int:
        return self.sampler.micro_batches_per_epoch()

    def start(self, epoch: int, micro_batch: int, restart: bool = False) -> None:
        """Feed epoch ``epoch`` from micro-batch ``micro_batch`` on (forgets anything prepared before).
        ``restart``: the same pass again after a pipeline failure; bad files of batches
        already fed once are not reported twice."""
        self._drop_pending()
        self.sampler.epoch, self.sampler.start = epoch, 0
        self.order = np.fromiter(iter(self.sampler), dtype=np.int64)
        self.epoch, self.next_micro_batch, self.in_flight = epoch, micro_batch, []
        if not restart:
            self.reported_upto = micro_batch - 1

    def __call__(self):
        while True:
            if self.next_micro_batch >= self.micro_batches_per_epoch():
                raise StopIteration
            fed = self._take(self.next_micro_batch)
            self.next_micro_batch += 1
            if fed.bad and fed.micro_batch > self.reported_upto:
                self.on_bad(fed.bad)
            self.reported_upto = max(self.reported_upto, fed.micro_batch)
            if fed.columns is None:  # no readable file at all: the loader raises the error
                self.error = fed.error
                raise StopIteration
            self.in_flight.append(fed)
            return fed.columns

    def consumed(self) -> FedBatch:
        """Mark the oldest fed batch as delivered; returns it."""
        return self.in_flight.pop(0)

    def close(self) -> None:
        self._drop_pending()
        for pool in (self._pool, self._readers):
            if pool is not None:
                pool.shutdown(wait=False)
        self._pool = self._readers = None

    # -- preparation

    def _take(self, micro_batch: int) -> FedBatch:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastbyol-dali-feeder")
        for m in range(micro_batch, min(micro_batch + self.lookahead + 1, self.micro_batches_per_epoch())):
            if m not in self._pending:
                self._pending[m] = self._pool.submit(self.prepare, self.order, self.epoch, m)
        return self._pending.pop(micro_batch).result()

    def _drop_pending(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending = {}

    def prepare(self, order: np.ndarray, epoch: int, micro_batch: int) -> FedBatch:
        """Read, check and draw for micro-batch ``micro_batch`` of ``order`` (this rank's sample order in
        ``epoch``): a pure function of its arguments and the files. Files are read and checked
        by ``read_threads`` threads (reads release the GIL, so they overlap on a network file
        system); the draws are one vectorised call for the batch; each column is one array."""
        b = self.batch_size
        idx = order[micro_batch * b:(micro_batch + 1) * b]
        src = self.source
        bad: List[int] = []
        if src.array is not None:  # decoded pixels (CIFAR): nothing to read or check
            images, fed = src.array[idx], idx
            heights, widths = np.full(len(idx), images.shape[1]), np.full(len(idx), images.shape[2])
        else:
            items = self._read_all(idx.tolist())
            fed = idx.copy()
            for k, i in enumerate(idx.tolist()):
                if items[k] is None:  # unreadable: the next readable sample stands in
                    self.substitutes.bad.add(i)
                    try:
                        fed[k], items[k] = self.substitutes.resolve(i, self._load)
                    except NoReadableImage as e:
                        return FedBatch(micro_batch, np.zeros(0, np.int64), [], None, str(e))
                    bad.append(i)
            images = [data for data, _ in items]
            heights, widths = np.array([size for _, size in items]).reshape(-1, 2).T
        labels = src.labels[fed].astype(np.int64).reshape(-1, 1)
        v1, v2 = draw_samples(idx, heights, widths, self.aug, self.seed, epoch)
        k = self.aug.blur_kernel_size
        cols = dali_columns(v1, view_columns(self.aug.view1), k) + dali_columns(v2, view_columns(self.aug.view2), k)
        return FedBatch(micro_batch, fed, bad, [images, labels] + cols)

    def _read_all(self, indices: List[int]) -> list:
        """:meth:`_load` of every index (``None`` for known-bad ones). The first few are read
        here, timed: reads faster than :data:`SLOW_READ_S` (page cache) go on here, since
        threads would only contend for the GIL; slower ones (a network file system) go to
        ``read_threads`` threads in chunks, so their waits overlap."""
        def load_chunk(chunk):
            return [None if i in self.known_bad else self._load(i) for i in chunk]

        t0 = time.perf_counter()
        head = load_chunk(indices[:_PROBE_READS])
        rest = indices[_PROBE_READS:]
        per_read = (time.perf_counter() - t0) / max(1, len(head))
        n = min(self.read_threads, len(rest))
        if n <= 1 or per_read < SLOW_READ_S:
            return head + load_chunk(rest)
        if self._readers is None:
            self._readers = ThreadPoolExecutor(self.read_threads, thread_name_prefix="fastbyol-dali-read")
        step = -(-len(rest) // n)
        chunks = [rest[k:k + step] for k in range(0, len(rest), step)]
        return head + [item for part in self._readers.map(load_chunk, chunks) for item in part]

    def _load(self, i: int):
        """``(encoded bytes, (h, w))`` of sample ``i``; ``None`` when unreadable."""
        try:
            data = self.read(self.source, i)
        except OSError:
            return None
        size = check_encoded(data)
        if size is None:
            return None
        return np.frombuffer(data, dtype=np.uint8), size

    def path(self, i: int) -> str:
        return sample_name(self.source, i)
