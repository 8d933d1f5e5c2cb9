"""The DALI data path: decoding and both BYOL views on the GPU (or DALI's CPU backend).

Design: **the host draws, DALI computes.** A Python feeder hands DALI each batch as encoded
bytes (or CIFAR pixels) *plus every random parameter of both views*, drawn per sample as a
function of ``(seed, epoch, index)`` (:func:`fastbyol.augment.draw_samples`); the pipeline itself holds no random operator.
This buys three things DALI's own readers and ``fn.random.*`` cannot give:

* **Exact resume.** Sample order is :class:`~fastbyol.data.batching.EpochShardSampler`'s
  permutation of ``(seed, epoch)``, the same order and sharding as the torch path (each rank a
  disjoint strided shard; the tail that fills no global batch dropped, so every epoch has
  ``len(loader)`` full batches: ``LastBatchPolicy.DROP`` done by the feeder); the crops and
  photometric draws are functions of ``(seed, epoch, index)``. ``set_epoch(e, k)`` replays
  micro-batch ``k`` of epoch ``e`` bit for bit, whatever ran before, from ``(seed, epoch, k)``
  alone. With ``fn.readers.file`` and ``fn.random.*`` the order and the draws come from states
  that advance through the run (a shuffle buffer, or ``shuffle_after_epoch``; per-operator
  RNGs): reaching epoch ``e`` micro-batch ``k`` means replaying the run or saving DALI's own
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
  blacklists the culprit and rebuilds the pipeline at the same micro-batch (identical batches, since
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
    >>> loader.set_epoch(3, start_micro_batch=120)  # exact resume
    >>> for batch in loader:
    ...     loss = model(batch.view1, batch.view2)
"""
from __future__ import annotations

import logging

from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..config import AugmentConfig
from ..errors import FastByolError
from .base import TwoViewBatch
from .image_source import ImageSource, read_encoded
from .substitute import SUBSTITUTED_MSG, NoReadableImage

log = logging.getLogger("fastbyol.data")
from .dali_feeder import TwoViewFeeder, cores_per_rank
from .dali_pipeline import byol_two_view_pipeline, import_dali

log = logging.getLogger("fastbyol.data")


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
                 channels_last: bool = False, out_dtype: torch.dtype = torch.float32,
                 jpeg_fancy_upsampling: bool = True):
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
        self.jpeg_fancy_upsampling = jpeg_fancy_upsampling  # see byol_two_view_pipeline
        self.feeder = TwoViewFeeder(source, aug, batch_size, seed, rank, world_size)
        self.feeder.on_bad = self._note_bad
        self.epoch, self.start_micro_batch = 0, 0
        self._skipped = 0
        self.bad_files: List[str] = []
        self._iterator = None  # DALIGenericIterator, reusable after a clean end of epoch
        self.last_indices = np.zeros(0, np.int64)  # source indices of the batch yielded last
        self._pass: Optional[object] = None  # the running __iter__

    def __len__(self) -> int:
        """Micro-batches per epoch (full batches only)."""
        return self.feeder.micro_batches_per_epoch()

    @property
    def skipped(self) -> int:
        return self._skipped

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None:
        self.epoch, self.start_micro_batch = epoch, start_micro_batch

    def _build(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = byol_two_view_pipeline(
            self.feeder, self.aug, self.batch_size, encoded=self.source.files is not None,
            device_id=self.device.index if self.device.type == "cuda" else None,
            num_threads=self.workers if self.workers > 0 else cores_per_rank(),
            seed=self.seed * 1_000_003 + self.rank, fp16=self.out_dtype == torch.float16,
            channels_last=self.channels_last, jpeg_fancy_upsampling=self.jpeg_fancy_upsampling)
        # No reader and no size: the feeder ends the epoch (full batches only, the DROP policy)
        # by raising StopIteration; DALI's own last-batch policies do not apply.
        return DALIGenericIterator([pipe], ["view1", "view2", "labels"], prepare_first_batch=False)

    def __iter__(self) -> Iterator[TwoViewBatch]:
        """One pass over the epoch set by :meth:`set_epoch`. One pass at a time: starting a new
        one takes over the pipeline from any earlier, unfinished one."""
        micro_batch, restart, clean = self.start_micro_batch, False, False
        self._pass = token = object()
        try:
            while True:
                self.feeder.start(self.epoch, micro_batch, restart=restart)
                if self._iterator is None:
                    self._iterator = self._build()
                else:
                    self._iterator.reset()  # after a clean epoch end; DALI re-runs the feeder now
                try:
                    for out in self._iterator:
                        fed = self.feeder.consumed()
                        micro_batch, self.last_indices = fed.micro_batch + 1, fed.indices
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
        return not self.feeder.in_flight and self.feeder.next_micro_batch >= self.feeder.micro_batches_per_epoch()

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
