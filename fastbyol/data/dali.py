"""The DALI data path: decoding and both BYOL views on the GPU (or DALI's CPU backend).

Design: **the host draws, DALI computes.** A Python feeder hands DALI each batch as encoded
bytes (or CIFAR pixels) *plus every random parameter of both views*, drawn per sample as a
function of ``(seed, epoch, index)`` (:func:`fastbyol.augment.draw_samples`); the pipeline itself holds no random operator.
This buys three things DALI's own readers and ``fn.random.*`` cannot give:

* **Exact resume.** Sample order is :class:`~fastbyol.data.torch_loader.EpochShardSampler`'s
  permutation of ``(seed, epoch)``, the same order and sharding as the torch path (each rank a
  disjoint strided shard; the tail that fills no global batch dropped, so every epoch has
  ``len(loader)`` full batches: ``LastBatchPolicy.DROP`` done by the feeder); the crops and
  photometric draws are functions of ``(seed, epoch, index)``. ``set_epoch(e, k)`` replays
  batch ``k`` of epoch ``e`` bit for bit, whatever ran before, from ``(seed, epoch, step)``
  alone. With ``fn.readers.file`` and ``fn.random.*`` the order and the draws come from states
  that advance through the run (a shuffle buffer, or ``shuffle_after_epoch``; per-operator
  RNGs): reaching epoch ``e`` step ``k`` means replaying the run or saving DALI's own
  checkpoint blob next to ours, and the order would differ from the torch path's.
* **The torch path's choices.** The draws are :func:`fastbyol.augment.draw_samples`', the
  torch path's, so for the same seed both paths cut the same windows and make the same flip,
  jitter, grayscale, blur and solarisation choices for every image; DALI resizes with
  antialiased bicubic filtering (within 1 grey level of PIL's).
* **Bad files never stop a run.** The feeder reads each file and checks it cheaply (frame
  header, JPEG end-of-image / PNG ``IEND`` marker: :func:`~fastbyol.data.image_check.check_encoded`); an
  unreadable file is replaced by the next readable sample (:mod:`~fastbyol.data.substitute`, as
  on the torch path), counted (:attr:`DaliTwoViewLoader.skipped`) and logged: batches never
  shrink, so ranks stay in step.
  A file that passes the check and still fails in DALI's decoder (a corrupt Huffman table, say)
  aborts the pipeline; the loader then decodes the batches in flight one file at a time,
  blacklists the culprit and rebuilds the pipeline at the same step (identical batches, since
  nothing is random inside it).

Per view, in the torch path's order (:func:`fastbyol.augment.augment_view`), every choice per
sample (from :func:`fastbyol.augment.draw_samples`, turned into pipeline inputs by
:mod:`fastbyol.data.dali_params`); parameters from
:class:`~fastbyol.config.AugmentConfig`:

1. random resized crop: ``fn.resize`` with a per-sample ROI (crop and resize in one pass),
   cubic, antialiased, to ``image_size``², uint8 (as the torch path's PIL crop);
2. colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue **in a
   random order per sample**, as torchvision's ColorJitter. Without clamping, each of the four
   is affine in RGB (contrast pulls toward the mean luma, a linear function of the crop's mean
   colour ``m``), so any order composes into ``y = A·x + T·m`` with per-sample 3×3 matrices
   ``A, T`` built on the host: one ``fn.coord_transform`` pass, whatever the order. Two
   departures from torchvision: values are clamped to [0, 255] once after the four ops, not
   after each one; hue is the rotation about the grey axis (exact at multiples of 120°, mean
   abs. error 0.065 against HSV at the extreme ±0.1 turn) instead of an HSV round trip;
3. grayscale (luma 0.299/0.587/0.114) with probability ``grayscale_p``;
4. Gaussian blur, σ ~ U(``blur_sigma``), window ``aug.blur_kernel_size`` cut to ±4σ
   (:func:`~fastbyol.data.dali_params.blur_window`), reflect-101 borders (as the torch path), with probability ``blur_p``;
   not built when 0;
5. solarisation (x ≥ 127.5 → 255 − x) with probability ``solarize_p``;
6. ``fn.crop_mirror_normalize``: the horizontal flip (probability ``flip_p``; flipping last is
   equivalent since every step above commutes with it), mean/std ×255, CHW (or HWC, viewed as
   channels-last NCHW), float32/float16.

Ops that only some samples take (grayscale, blur when ``blur_p < 1``, solarise) sit under DALI
conditionals (``if predicate:`` with a per-sample predicate), so they cost only for the samples
that take them.

GPU mode (``device`` is CUDA) differs only in placement: ``device="mixed"`` decoding (nvJPEG /
the hardware JPEG decoder, with the CPU decoder's chroma upsampling) and the ops on the GPU;
CPU mode (``device_id=None``) runs the same definition on DALI's CPU backend.

Examples:
    >>> loader = DaliTwoViewLoader(scan_image_folder("train/"), AugmentConfig(), 256,
    ...                            torch.device("cuda", 0))
    >>> loader.set_epoch(3, start_step=120)  # exact resume
    >>> for batch in loader:
    ...     loss = model(batch.view1, batch.view2)
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set

import numpy as np
import torch

from ..augment import GRAY_WEIGHTS, draw_samples
from ..config import AugmentConfig, ViewConfig
from ..errors import FastByolError
from .base import TwoViewBatch
from .dali_params import VIEW_COLUMNS, dali_columns, view_columns
from .image_check import check_encoded
from .image_source import ImageSource, read_encoded
from .substitute import SUBSTITUTED_MSG, NoReadableImage, Substitutes
from .torch_loader import EpochShardSampler, sample_name

log = logging.getLogger("fastbyol.data")

DALI_MISSING = ("--loader dali needs NVIDIA DALI: pip install 'fastbyol[dali]' "
                "(nvidia-dali-cuda130, or nvidia-dali-cuda120 for CUDA 12)")

_SOLARIZE_AT = 127.5  # x/255 >= 0.5, the torch path's threshold
SLOW_READ_S = 200e-6  # a file read slower than this (not from the page cache) goes to the read threads
_PROBE_READS = 4  # reads timed per batch to tell


def cores_per_rank() -> int:
    """The CPU cores this process may use, shared among the node's ranks (``LOCAL_WORLD_SIZE``
    from torchrun, ``LOCAL_SIZE`` from the DeepSpeed launcher): DALI's thread count by default."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, cores // max(1, local))


def import_dali():
    """``(nvidia.dali, fn, types)``, or the install hint as a :class:`FastByolError`."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError:
        raise FastByolError(DALI_MISSING) from None
    return dali, fn, types


# ----------------------------------------------------------------------------- feeder

@dataclass
class FedBatch:
    step: int
    indices: np.ndarray  # the samples fed (stand-ins in place of unreadable ones)
    bad: List[int]  # the batch's positions' samples that were replaced
    columns: Optional[List[list]]  # pipeline inputs; None when no sample of the data set is readable
    error: str = ""  # why columns is None


class TwoViewFeeder:
    """The pipeline's external source: batch ``k`` of epoch ``e`` for one rank.

    Called by DALI (``fn.external_source(source=feeder, batch=True)``) once per batch; raises
    ``StopIteration`` after the epoch's last full batch. Batches are prepared ``lookahead``
    steps ahead on a background thread (the draws, the columns); when file reads are slow
    (a network file system), they and the header checks run on ``read_threads`` more threads,
    so the training thread rarely waits and ~1 ms reads overlap (``benchmarks/bench_feeder.py``).
    """

    def __init__(self, source: ImageSource, aug: AugmentConfig, batch_size: int, seed: int, rank: int,
                 world_size: int, lookahead: int = 3, read_threads: int = 16):
        self.source, self.aug, self.batch_size, self.seed = source, aug, batch_size, seed
        self.sampler = EpochShardSampler(len(source), batch_size, seed, rank, world_size)
        self.lookahead = lookahead
        self.substitutes = Substitutes(len(source), self.path)
        self.known_bad: Set[int] = self.substitutes.bad  # unreadable, or rejected by DALI's decoder
        self.error = ""  # set when no sample can be read; the loader raises it
        self.epoch, self.next_step, self.order = 0, 0, np.zeros(0, np.int64)
        self.reported_upto = -1  # last step whose bad files were reported
        self.in_flight: List[FedBatch] = []  # fed to DALI, not yet consumed, oldest first
        self.on_bad: Callable[[List[int]], None] = lambda bad: None
        self.read_threads = read_threads
        self.read: Callable[[ImageSource, int], bytes] = read_encoded  # swappable (the benchmark's slow reader)
        self._pool: Optional[ThreadPoolExecutor] = None  # prepares batches ahead, in order
        self._readers: Optional[ThreadPoolExecutor] = None  # reads files for the batch being prepared
        self._pending: Dict[int, Future] = {}

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch()

    def start(self, epoch: int, step: int, restart: bool = False) -> None:
        """Feed epoch ``epoch`` from batch ``step`` on (forgets anything prepared before).
        ``restart``: the same pass again after a pipeline failure; bad files of batches
        already fed once are not reported twice."""
        self._drop_pending()
        self.sampler.epoch, self.sampler.start = epoch, 0
        self.order = np.fromiter(iter(self.sampler), dtype=np.int64)
        self.epoch, self.next_step, self.in_flight = epoch, step, []
        if not restart:
            self.reported_upto = step - 1

    def __call__(self):
        while True:
            if self.next_step >= self.steps_per_epoch():
                raise StopIteration
            fed = self._take(self.next_step)
            self.next_step += 1
            if fed.bad and fed.step > self.reported_upto:
                self.on_bad(fed.bad)
            self.reported_upto = max(self.reported_upto, fed.step)
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

    def _take(self, step: int) -> FedBatch:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastbyol-dali-feeder")
        for s in range(step, min(step + self.lookahead + 1, self.steps_per_epoch())):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self.prepare, self.order, self.epoch, s)
        return self._pending.pop(step).result()

    def _drop_pending(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending = {}

    def prepare(self, order: np.ndarray, epoch: int, step: int) -> FedBatch:
        """Read, check and draw for batch ``step`` of ``order`` (this rank's sample order in
        ``epoch``): a pure function of its arguments and the files. Files are read and checked
        by ``read_threads`` threads (reads release the GIL, so they overlap on a network file
        system); the draws are one vectorised call for the batch; each column is one array."""
        b = self.batch_size
        idx = order[step * b:(step + 1) * b]
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
                        return FedBatch(step, np.zeros(0, np.int64), [], None, str(e))
                    bad.append(i)
            images = [data for data, _ in items]
            heights, widths = np.array([size for _, size in items]).reshape(-1, 2).T
        labels = src.labels[fed].astype(np.int64).reshape(-1, 1)
        v1, v2 = draw_samples(idx, heights, widths, self.aug, self.seed, epoch)
        k = self.aug.blur_kernel_size
        cols = dali_columns(v1, view_columns(self.aug.view1), k) + dali_columns(v2, view_columns(self.aug.view2), k)
        return FedBatch(step, fed, bad, [images, labels] + cols)

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


# ----------------------------------------------------------------------------- pipeline

def _view(fn, types, image, p: dict, view: ViewConfig, aug: AugmentConfig, out_type, layout: str):
    """One BYOL view of decoded uint8 HWC images; ``p`` holds this view's parameter inputs."""
    s = aug.image_size
    # uint8 out: clipped and rounded as PIL's bicubic (the torch path's crop) is.
    x = fn.resize(image, size=[s, s], roi_start=p["roi_start"], roi_end=p["roi_end"], roi_relative=False,
                  interp_type=types.INTERP_CUBIC, antialias=True)
    if view.jitter_p > 0:
        mean = fn.reductions.mean(x, axes=[0, 1], keep_dims=True, dtype=types.FLOAT)  # [1, 1, 3]
        x = _clamp255(fn.coord_transform(x, M=p["jitter_a"], dtype=types.FLOAT)
                      + fn.coord_transform(mean, M=p["jitter_t"]))
    else:
        x = fn.cast(x, dtype=types.FLOAT)
    gray = np.outer(np.ones(3), GRAY_WEIGHTS).astype(np.float32).ravel().tolist()  # luma into every channel
    if view.grayscale_p >= 1:
        x = fn.coord_transform(x, M=gray)
    elif view.grayscale_p > 0:
        if p["gray"]:
            x = fn.coord_transform(x, M=gray)
    if view.blur_p >= 1:
        x = fn.gaussian_blur(x, sigma=p["sigma"], window_size=p["window"])
    elif view.blur_p > 0:
        if p["blur"]:
            x = fn.gaussian_blur(x, sigma=p["sigma"], window_size=p["window"])
    if view.solarize_p >= 1:
        x = _solarize(x)
    elif view.solarize_p > 0:
        if p["solarize"]:
            x = _solarize(x)
    return fn.crop_mirror_normalize(x, mirror=p["flip"], mean=[255.0 * m for m in aug.mean],
                                    std=[255.0 * sd for sd in aug.std], output_layout=layout, dtype=out_type)


def _solarize(x):
    return x + (x >= _SOLARIZE_AT) * (255.0 - 2.0 * x)


def _clamp255(x):
    from nvidia.dali import math as dmath

    return dmath.clamp(x, 0.0, 255.0)


def byol_two_view_pipeline(source: Callable, aug: AugmentConfig, batch_size: int, *, encoded: bool,
                           device_id: Optional[int] = None, num_threads: int = 2, seed: int = 0,
                           fp16: bool = False, channels_last: bool = False, prefetch_queue_depth: int = 2):
    """Build the two-view DALI pipeline.

    Args:
        source: batch callable returning the columns ``[images, labels, *view1, *view2]``
            (:func:`view_columns` per view), e.g. a :class:`TwoViewFeeder`.
        aug: augmentation parameters; which ops exist is decided from it once, here.
        batch_size: maximum samples per batch (batches may be smaller).
        encoded: images are encoded files (decoded here) rather than uint8 HWC pixels.
        device_id: CUDA device for GPU mode; ``None`` runs everything on DALI's CPU backend.
        fp16: float16 output instead of float32.
        channels_last: HWC output (a channels-last NCHW tensor once permuted) instead of CHW.

    Returns:
        A built ``nvidia.dali.Pipeline`` with outputs ``(view1, view2, labels)``.
    """
    dali, fn, types = import_dali()
    dev = "cpu" if device_id is None else "gpu"
    out_type = types.FLOAT16 if fp16 else types.FLOAT
    layout = "HWC" if channels_last else "CHW"
    names = [view_columns(v) for v in aug.views()]
    dtypes = [types.UINT8, types.INT64] + [getattr(types, VIEW_COLUMNS[n]) for ns in names for n in ns]

    @dali.pipeline_def(enable_conditionals=True)
    def two_views():
        cols = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes)
        images, labels = cols[0], cols[1]
        if encoded:
            # GPU: nvJPEG's memory padding and preallocation as DALI's ResNet-50 example, so its
            # buffers are sized once instead of regrown for every larger image.
            hints = dict(device_memory_padding=211025920, host_memory_padding=140544512,
                         preallocate_width_hint=5980, preallocate_height_hint=6430) if dev == "gpu" else {}
            images = fn.decoders.image(images, device="mixed" if dev == "gpu" else "cpu", output_type=types.RGB,
                                       adjust_orientation=False,  # PIL (the torch path) ignores EXIF too
                                       jpeg_fancy_upsampling=True,  # the CPU decoder's (and PIL's) chroma
                                       **hints)
        else:
            images = fn.reshape(images, layout="HWC")
            if dev == "gpu":
                images = images.gpu()
        views = []
        first = 2
        for view, ns in zip(aug.views(), names):
            p = dict(zip(ns, cols[first:first + len(ns)]))
            first += len(ns)
            views.append(_view(fn, types, images, p, view, aug, out_type, layout))
        return views[0], views[1], labels

    pipe = two_views(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                     seed=seed % (2 ** 31), prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True)
    pipe.build()
    return pipe


# ----------------------------------------------------------------------------- loader

class DaliTwoViewLoader:
    """:class:`~fastbyol.data.base.TwoViewLoader` over a DALI pipeline (see the module doc).

    Args:
        source: the training images (files or a uint8 array).
        aug: augmentation parameters (shared with the torch path).
        batch_size: per-rank micro-batch.
        device: CUDA → GPU mode on ``device.index``; CPU → DALI's CPU backend.
        seed: shuffling and augmentation seed (the same streams as the torch path).
        rank, world_size: this rank's shard of each epoch's permutation.
        workers: DALI's CPU threads (decoding on the CPU backend, CPU operators); 0: the CPU
            cores per rank on this node (:func:`cores_per_rank`). The feeder reads files on
            its own 16 threads either way.
        channels_last: views in channels-last memory format.
        out_dtype: float32, float16 (produced by DALI) or bfloat16 (cast in torch).

    Raises:
        FastByolError: DALI is not installed, or the batch is larger than the data set.
    """

    def __init__(self, source: ImageSource, aug: AugmentConfig, batch_size: int, device: torch.device,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 2,
                 channels_last: bool = False, out_dtype: torch.dtype = torch.float32):
        import_dali()
        if len(source) < batch_size * world_size:
            raise FastByolError(
                f"batch size {batch_size * world_size} is larger than the data set ({len(source)} images)")
        self.source, self.aug, self.batch_size = source, aug, batch_size
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        self.channels_last, self.out_dtype = channels_last, out_dtype
        self.feeder = TwoViewFeeder(source, aug, batch_size, seed, rank, world_size)
        self.feeder.on_bad = self._note_bad
        self.epoch, self.start_step = 0, 0
        self._skipped = 0
        self.bad_files: List[str] = []
        self._iterator = None  # DALIGenericIterator, reusable after a clean end of epoch
        self.last_indices = np.zeros(0, np.int64)  # source indices of the batch yielded last
        self._pass: Optional[object] = None  # the running __iter__

    def __len__(self) -> int:
        return self.feeder.steps_per_epoch()

    @property
    def skipped(self) -> int:
        return self._skipped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = byol_two_view_pipeline(
            self.feeder, self.aug, self.batch_size, encoded=self.source.files is not None,
            device_id=self.device.index if self.device.type == "cuda" else None,
            num_threads=self.workers if self.workers > 0 else cores_per_rank(),
            seed=self.seed * 1_000_003 + self.rank, fp16=self.out_dtype == torch.float16,
            channels_last=self.channels_last)
        # No reader and no size: the feeder ends the epoch (full batches only, the DROP policy)
        # by raising StopIteration; DALI's own last-batch policies do not apply.
        return DALIGenericIterator([pipe], ["view1", "view2", "labels"], prepare_first_batch=False)

    def __iter__(self) -> Iterator[TwoViewBatch]:
        """One pass over the epoch set by :meth:`set_epoch`. One pass at a time: starting a new
        one takes over the pipeline from any earlier, unfinished one."""
        step, restart, clean = self.start_step, False, False
        self._pass = token = object()
        try:
            while True:
                self.feeder.start(self.epoch, step, restart=restart)
                if self._iterator is None:
                    self._iterator = self._build()
                else:
                    self._iterator.reset()  # after a clean epoch end; DALI re-runs the feeder now
                try:
                    for out in self._iterator:
                        fed = self.feeder.consumed()
                        step, self.last_indices = fed.step + 1, fed.indices
                        yield self._to_batch(out[0])
                    if self.feeder.error:
                        raise NoReadableImage(self.feeder.error)
                    clean = True
                    return
                except RuntimeError as err:  # DALI aborts the whole pipeline on one undecodable file
                    self._iterator = None
                    if not self._blacklist_failed(err):
                        raise
                    restart = True  # same epoch, from the first batch not yet delivered
        finally:
            if self._pass is token:
                self._finish_pass(clean)

    def _finish_pass(self, clean: bool) -> None:
        if not clean and self._iterator is not None and self._only_end_left():
            try:  # the consumer stopped after the last batch (the trainer does): keep the pipeline
                for _ in self._iterator:
                    break
                else:
                    clean = True
            except Exception:
                pass
        if not clean:  # abandoned mid-epoch or failed: the pipeline holds stale prefetched work
            self._iterator = None
        self.feeder.close()

    def _only_end_left(self) -> bool:
        """Every batch of the epoch was fed and consumed: only DALI's end-of-epoch is pending."""
        return not self.feeder.in_flight and self.feeder.next_step >= self.feeder.steps_per_epoch()

    def _to_batch(self, out: Dict[str, torch.Tensor]) -> TwoViewBatch:
        views = []
        for name in ("view1", "view2"):
            v = out[name]
            if self.channels_last:
                v = v.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last, no copy
            if v.device != self.device:
                v = v.to(self.device, non_blocking=True)
            views.append(v if v.dtype == self.out_dtype else v.to(self.out_dtype))
        labels = out["labels"].reshape(-1).to(self.device, non_blocking=True)
        return TwoViewBatch(views[0], views[1], labels)

    # -- bad files

    def _note_bad(self, bad: List[int]) -> None:
        self._skipped += len(bad)
        paths = [self.feeder.path(i) for i in bad]
        self.bad_files.extend(paths[: max(0, 20 - len(self.bad_files))])
        log.warning(SUBSTITUTED_MSG, len(bad), self._skipped, paths[0])

    def _blacklist_failed(self, err: Exception) -> bool:
        """After a pipeline failure: find the files of the in-flight batches that DALI cannot
        decode; they are skipped from now on. False when none fails alone (the error was not
        the data's)."""
        if self.source.files is None:
            return False
        suspects = [i for fed in self.feeder.in_flight for i in fed.indices.tolist()]
        failing = self._undecodable(suspects)
        if not failing:
            return False
        self.feeder.known_bad.update(failing)
        log.warning("DALI could not decode %s; rebuilding the pipeline without %s (%s)",
                    self.feeder.path(failing[0]), "it" if len(failing) == 1 else f"these {len(failing)} files",
                    " ".join(str(err).split())[:160])
        self._note_bad(failing)
        return True

    def _undecodable(self, indices: Sequence[int]) -> List[int]:
        """The files among ``indices`` that DALI's decoder (in this loader's mode) rejects, one
        at a time; the probe pipeline is rebuilt after each rejection (DALI pipelines do not
        survive an operator error)."""
        dali, fn, types = import_dali()
        gpu = self.device.type == "cuda"

        @dali.pipeline_def(batch_size=1, num_threads=1, device_id=self.device.index if gpu else None,
                           prefetch_queue_depth=1)
        def probe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            return fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                     adjust_orientation=False)

        failing, pipe = [], None
        for i in indices:
            try:
                data = np.frombuffer(read_encoded(self.source, i), dtype=np.uint8)
                if pipe is None:
                    pipe = probe()
                    pipe.build()
                pipe.feed_input("encoded", [data])
                pipe.run()
            except Exception:  # OSError or the decoder's error
                failing.append(i)
                pipe = None
        return failing
