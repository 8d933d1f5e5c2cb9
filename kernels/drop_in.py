"""The fused EMA behind the peers' own call signatures: swap one import, keep the loop.

- :func:`get_ema_multi_avg_fn` for ``torch.optim.swa_utils.AveragedModel``;
- :class:`ModelEmaV3`, timm's ``timm.utils.ModelEmaV3`` (same arguments, ``module``, ``update``);
- :func:`update_momentum`, lightly's ``lightly.models.utils.update_momentum``.

Each computes what its peer computes (torch.lerp's formula in fp32, the same integer-buffer
and warm-up rules), to fp32 rounding, in one fused launch per dtype pair.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .ema import Momentum, ema_update_
from .module_ema import ModuleEMA, unwrap


def get_ema_multi_avg_fn(decay: float = 0.999, *, backend: str = "auto"):
    """``multi_avg_fn`` for ``AveragedModel``: torch's ``get_ema_multi_avg_fn``, fused.

    ``AveragedModel`` calls it once per (device, dtype) group with the averaged and the
    current tensors. Floating groups take one fused pass; integer groups (``num_batches_tracked``
    under ``use_buffers=True``) get torch's own expression, ``copy_(ema·decay + model·(1 − decay))``
    (a float product truncated back to the integer), so they end where torch's do.

    Args:
        decay: in [0, 1] (checked here, as torch does).
        backend: ``auto`` | ``triton`` | ``torch`` (see :func:`ema_update_`).

    Examples:
        >>> from torch.optim.swa_utils import AveragedModel
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        >>> ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
        >>> ema.update_parameters(net)
    """
    if not 0.0 <= decay <= 1.0:  # NaN fails too
        raise ValueError(f"get_ema_multi_avg_fn: decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def ema_update(ema_param_list, current_param_list, _num_averaged) -> None:
        if ema_param_list[0].is_floating_point():
            ema_update_(ema_param_list, current_param_list, decay, backend=backend)
        elif ema_param_list[0].is_complex():
            torch._foreach_lerp_(ema_param_list, current_param_list, 1 - decay)
        else:
            for p_ema, p_model in zip(ema_param_list, current_param_list, strict=True):
                p_ema.copy_(p_ema * decay + p_model * (1 - decay))

    return ema_update


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: Momentum, *, backend: str = "auto") -> None:
    """lightly's ``update_momentum``: ``model_ema``'s parameters ← m·ema + (1 − m)·model, fused.

    Parameters are paired by position, buffers untouched, as lightly does; unlike lightly a
    length or shape mismatch raises instead of truncating.

    Examples:
        >>> online = torch.nn.Linear(3, 2); momentum = copy.deepcopy(online)
        >>> update_momentum(online, momentum, m=0.99)
    """
    ema_update_(list(model_ema.parameters()), list(model.parameters()), m, backend=backend)


class ModelEmaV3(nn.Module):
    """timm's ``ModelEmaV3`` (timm 1.0.31), the update fused: same arguments, same maths.

    Keeps a moving average of everything in the model's state: floating parameters and
    buffers are averaged, integer buffers copied; with ``exclude_buffers`` only parameters are
    averaged and every buffer copied. ``decay``, ``min_decay``, ``update_after_step`` and the
    warm-up (``use_warmup``, ``warmup_gamma``, ``warmup_power``) give timm's ``get_decay``;
    ``device`` keeps the average elsewhere (e.g. ``"cpu"``), ``dtype`` in another precision
    (e.g. fp32 for a bf16 model); bf16 averages round stochastically by default
    (``stochastic_rounding``, seeded by ``stochastic_rounding_seed``: ranks round alike).
    ``foreach`` is accepted and ignored (there is one fused path). ``backend`` selects
    the kernel or the reference (see :func:`ema_update_`).

    One difference: timm walks ``state_dict()``, which leaves non-persistent buffers alone;
    here they are averaged (floating) or copied like the persistent ones. The model may be
    wrapped (DDP, DeepSpeed, ``torch.compile``); ``module`` is the bare copy.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        >>> ema = ModelEmaV3(model, decay=0.999, use_warmup=True)
        >>> for step in range(3):
        ...     ema.update(model, step=step)
        >>> _ = ema.module(torch.randn(2, 3))
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0, foreach: bool = True,
                 exclude_buffers: bool = False, backend: str = "auto"):
        super().__init__()
        self.module = copy.deepcopy(unwrap(model))
        self.module.eval()
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.device, self.dtype, self.foreach, self.exclude_buffers = device, dtype, foreach, exclude_buffers
        self.stochastic_rounding, self.stochastic_rounding_seed = stochastic_rounding, stochastic_rounding_seed
        self.backend = backend
        if device is not None:
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)
        self._bound = None  # (model, its copy on ``device`` or None, ModuleEMA): paired on the first update

    def get_decay(self, step: Optional[int] = None) -> float:
        """timm's decay: ``decay`` without a step; 0 (a copy) until ``update_after_step``; the
        warm-up ``1 − (1 + k/γ)^−power`` clamped to [min_decay, decay] if enabled."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def _pairing(self, model: nn.Module) -> ModuleEMA:
        """The fused pairing for ``model`` (built on the first update, rebuilt for another model)."""
        model = unwrap(model)
        if self._bound is None or self._bound[0] is not model:
            ema_device = next(self.module.parameters()).device
            staged = None
            if next(model.parameters()).device != ema_device:
                # The average lives elsewhere: stage the model's tensors there (timm's
                # ``.to(device)`` per tensor), into fixed tensors the kernel's plan keeps.
                staged = copy.deepcopy(model).to(device=ema_device)
            ema = ModuleEMA(model if staged is None else staged, self.module,
                            buffers="copy" if self.exclude_buffers else "ema", backend=self.backend,
                            stochastic_rounding=self.stochastic_rounding, seed=self.stochastic_rounding_seed)
            self._bound = (model, staged, ema)  # a tuple: not registered as submodules
        return self._bound[2]

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """One EMA step toward ``model`` (the trained module, wrapped or not) at ``get_decay(step)``."""
        ema = self._pairing(model)
        model, staged, _ = self._bound
        if staged is not None:
            torch._foreach_copy_([*staged.parameters(), *staged.buffers()], [*model.parameters(), *model.buffers()])
        ema.update(self.get_decay(step))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s state into the average."""
        self._pairing(model)
        for ema_v, model_v in zip(self.module.state_dict().values(), unwrap(model).state_dict().values()):
            ema_v.copy_(model_v.to(device=ema_v.device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
