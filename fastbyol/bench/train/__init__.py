"""Whole BYOL training steps per second: fastbyol against lightly and byol-pytorch, one run.

Configurations (``--configs``): ``cifar-resnet18`` (ResNet-18 with the CIFAR stem, 32 px,
in-memory uint8 images) and ``imagenet-resnet50`` (ResNet-50, 224 px, a JPEG folder). Both use
BYOL's heads (projector 4096 → 256, predictor 4096 → 256), bf16 autocast on CUDA, per-device
batch 256 (``--batch 128,256,512`` sweeps).

Modes, each measured in the same run, on the same device, on the same images:

  fastbyol              Trainer.train_micro_batch of a real Trainer: DALI loader (torch loader where DALI or CUDA is
                        missing) → BYOL forward (fused loss) → LARS (multi-tensor) → fused EMA
  fastbyol-synthetic    the same step on views already on the device: the compute ceiling
                        (no decoding, no augmentation)
  lightly               lightly's BYOL example loop (lightly.transforms.BYOLTransform in a torch
                        DataLoader, BYOLProjectionHead/BYOLPredictionHead, update_momentum,
                        NegativeCosineSimilarity, SGD), heads resized to BYOL's
  byol-pytorch          byol-pytorch's ``BYOL`` learner and its README loop (Adam, its batched
                        default augmentation on the device; a DataLoader decodes and resizes)
                        (``use_simplicial_embeddings=False``: BYOL's network; 0.9.1 defaults to True)
  ablate-torch-loader   fastbyol with DALI → the torch DataLoader path
  ablate-eager-loss     fastbyol with the fused loss → its eager reference (``backend="torch"``)
  ablate-loop-ema       fastbyol with the fused EMA → a per-parameter loop (baselines.py)
  ablate-loop-lars      fastbyol with multi-tensor LARS → per-parameter LARS (baselines.py)

The peers get fastbyol's encoder, head widths and autocast; otherwise their loops are theirs.

Figures: images/s (median step time over the timed steps after warm-up; the mean over the
segment is kept too), peak GPU memory, the data pipeline's share (1 − e2e / ceiling), and
ratios to lightly and byol-pytorch. Every mode starts a fresh model and loader per segment,
so no prefetched batch or cached allocation carries over from another mode. A mode whose
package is missing is reported as ``skipped: <reason>``.

Scaling: with one device, an *estimate* for N devices from the measured step time and the
bytes all-reduced per step (the online network's fp32 gradients) at ``--interconnect-gbs``;
``--scaling`` also *measures* 1 → 2 processes on CPU (gloo, one flat gradient all-reduce per
step, synthetic inputs).

Layout: ``configs`` (what runs), ``data`` (generated folders, peer loaders), ``fastbyol_runner``
(the trainer's step), ``peers`` and ``lightly_style`` (the other loops), ``timing``, ``scaling``,
``report``, ``cli``.

    fastbyol bench                       # GPU: both configs, batch 256
    fastbyol bench --smoke               # CPU seconds (CI)
    fastbyol bench --configs cifar-resnet18 --batch 32 --steps 5 --scaling
    fastbyol bench --configs imagenet-resnet50 --batch 8 --loader dali   # DALI's CPU backend

Writes ``bench_train_<device>_<configs>.{json,md,png}`` to ``--out`` (``benchmarks/results``).
"""
from .cli import build_parser, main
from .configs import MODES, PEERS, BenchConfig, Context, Skip, bench_configs
from .data import PILDataset, build_source
from .fastbyol_runner import FastByolRunner
from .peers import LightlyRunner
from .report import machine_load, versions
from .timing import measure, summarise

__all__ = ["BenchConfig", "Context", "FastByolRunner", "LightlyRunner", "MODES", "PEERS", "PILDataset", "Skip",
           "bench_configs", "build_parser", "build_source", "machine_load", "main", "measure", "summarise", "versions"]
