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

    python benchmarks/bench_train.py                       # GPU: both configs, batch 256
    python benchmarks/bench_train.py --smoke               # CPU seconds (CI)
    python benchmarks/bench_train.py --configs cifar-resnet18 --batch 32 --steps 5 --scaling
    python benchmarks/bench_train.py --configs imagenet-resnet50 --batch 8 --loader dali   # DALI's CPU backend
    fastbyol bench -- --smoke                              # the same, through the CLI

Writes ``bench_train_<device>_<configs>.{json,md,png}`` to ``--out`` (``benchmarks/results``).
"""
import os as _os
import sys as _sys

_HERE = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))  # benchmarks/
for _p in (_HERE, _os.path.dirname(_HERE)):  # _common, baselines; fastbyol from the checkout
    if _p not in _sys.path:
        _sys.path.insert(0, _p)
from fastbyol._checkout import ensure_kernels  # noqa: E402

ensure_kernels()  # fastbyol_kernels from the checkout when it is not installed (also in spawned workers)
