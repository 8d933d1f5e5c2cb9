"""fastbyol_kernels: fused Triton kernels for BYOL and other momentum methods.

Needs only torch (and triton for the fused path). Each kernel has a plain PyTorch reference
beside it, which is also the fallback: ``backend="auto"`` runs Triton on CUDA tensors (or on
CPU tensors under ``TRITON_INTERPRET=1``) and the reference otherwise.

- :func:`byol_loss`, :func:`normalized_l2_loss`: the normalised-L2 loss, fused fwd + bwd.
- :func:`ema_update_`, :class:`ModuleEMA`: one-pass multi-tensor EMA of a target network.
"""
from .ema import ema_update_, ema_update_reference_
from .loss import byol_loss, byol_loss_reference, normalized_l2_loss, normalized_l2_loss_reference
from .module_ema import ModuleEMA

__all__ = ["byol_loss", "normalized_l2_loss", "ema_update_", "ModuleEMA", "byol_loss_reference",
           "normalized_l2_loss_reference", "ema_update_reference_"]
