"""fastbyol_kernels: fused Triton kernels for BYOL and other momentum methods.

Needs only torch, plus triton for the fused path (imported when a kernel first runs, so the
package and its references work without it). Each kernel has a plain PyTorch reference
beside it, which is also the fallback. Every entry point takes ``backend=``:

- ``"auto"`` (default): Triton on CUDA tensors (or on CPU tensors under
  ``TRITON_INTERPRET=1``) when triton is installed, the reference otherwise;
- ``"triton"``: the kernel, or a one-line RuntimeError saying why it cannot run here;
- ``"torch"``: the reference.

Contents:

- :func:`byol_loss` (symmetric, scalar) and :func:`normalized_l2_loss` (per row): BYOL's
  ``2 − 2·cos`` loss, one fused launch forward and one backward.
- :func:`ema_update_` and :class:`ModuleEMA`: ``target ← m·target + (1 − m)·online`` over
  whole parameter lists in one pass, momentum as a float or a device tensor (fp32 or fp64).
- :func:`photometric`: BYOL's per-sample colour augmentation (flip, colour jitter in each
  sample's order, grayscale, Gaussian blur of the samples that draw it, solarisation,
  normalisation) in one pass over the pixels plus a first pass for contrast's grey means,
  written in the training dtype.
- :func:`lars_step_`: one LARS step of a parameter group (per-tensor norms in two launches, in
  a fixed order: the same trust ratios on every run; the update in one more; 28 bytes per fp32
  parameter), :func:`lars_step_reference_` its
  ``_foreach`` reference (``fastbyol.optim.LARS`` runs either).
- Drop-ins with the peers' signatures (``drop_in.py``): :func:`get_ema_multi_avg_fn` for
  ``torch.optim.swa_utils.AveragedModel``, :class:`ModelEmaV3` (timm's), :func:`update_momentum`
  (lightly's); :func:`unwrap` looks through DDP, DeepSpeed and ``torch.compile`` wrappers.

Examples:
    >>> import torch, fastbyol_kernels as fk
    >>> p1, p2 = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    >>> fk.byol_loss(p1, p2, torch.randn(8, 32), torch.randn(8, 32)).backward()
    >>> online, target = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    >>> fk.ModuleEMA(online, target).update(0.99)
"""
from .augment import photometric, photometric_reference
from .ema import ema_update_, ema_update_reference_
from .lars import lars_step_, lars_step_reference_
from .loss import byol_loss, byol_loss_reference, normalized_l2_loss, normalized_l2_loss_reference
from .module_ema import ModuleEMA, unwrap
from .drop_in import ModelEmaV3, get_ema_multi_avg_fn, update_momentum

__all__ = ["byol_loss", "normalized_l2_loss", "ema_update_", "ModuleEMA", "byol_loss_reference",
           "normalized_l2_loss_reference", "ema_update_reference_", "unwrap", "get_ema_multi_avg_fn",
           "ModelEmaV3", "update_momentum", "photometric", "photometric_reference", "lars_step_",
           "lars_step_reference_"]
