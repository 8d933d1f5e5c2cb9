"""``fastbyol gpu-check``: one command that measures everything on the first GPU.

Parts, each with its own time cap (``settings.PARTS``), each in its own process:

  a. kernels          the compiled Triton kernels against float64 (fastbyol_kernels.check)
  b. micro            EMA, loss, LARS against their byte floors and eager / _foreach baselines
                      (fastbyol.bench.ema, .loss, .lars)
  c. e2e-r50          ResNet-50 @224, bf16, channels_last, per loop (fastbyol, lightly-style, lightly):
                      compute alone on pre-made views (-synthetic), the loader alone (-loader: decode +
                      augment, no model) and end to end on generated JPEGs, each scored as images over
                      the wall clock of a sustained window (>= 3 x workers x prefetch steps after
                      warm-up; workers shrunk to what /dev/shm holds, said in the record); plus
                      fastbyol's compute in NCHW (-synthetic-nchw: channels_last's share);
     e2e-cifar        the same for ResNet-18 CIFAR @32;
     e2e-r50-compile  ResNet-50 with --train.compile; peak memory for every row. The fastbyol rows
                      time Trainer.train_micro_batch of a real Trainer (fastbyol.bench.train)
  d. lightly-style    fastbyol ÷ the same step written as lightly's BYOL example (torch only),
                      measured in part c on the same device in the same run: the headline
  e. syncs            host syncs per step (torch.cuda.set_sync_debug_mode; CUDA only)
  f. dali             DALI pipeline images/s and end to end with DALI (when DALI imports)

Writes ``<out>/gpu_check_<device>/gpu_check.{json,md}`` (device, driver, versions, date; each
target met / missed). ``--tiny`` runs every part on a CPU in about a minute (CI).

    python -m fastbyol gpu-check              # a plain checkout, nothing installed
    fastbyol gpu-check --tiny                 # CPU smoke version
"""
from .run import main  # noqa: E402

__all__ = ["main"]
