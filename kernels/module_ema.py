"""Pair two modules once, update the target from the online every step."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from ._backend import BACKENDS
from .ema import Momentum, ema_update_

BUFFER_MODES = ("copy", "ema", "none")


def _pairs(kind: str, online: List[Tuple[str, torch.Tensor]], target: List[Tuple[str, torch.Tensor]]):
    """Tensors of both modules in matching order; the error names the first offending key."""
    for i in range(max(len(online), len(target))):
        on = online[i][0] if i < len(online) else None
        tn = target[i][0] if i < len(target) else None
        if on != tn:
            raise ValueError(f"ModuleEMA: {kind[:-1]} names differ at position {i}: online has "
                             f"{repr(on) if on else 'none'}, target has {repr(tn) if tn else 'none'}")
        o, t = online[i][1], target[i][1]
        if o.shape != t.shape:
            raise ValueError(f"ModuleEMA: {kind[:-1]} {on!r}: online shape {tuple(o.shape)} != target {tuple(t.shape)}")
    return [o for _, o in online], [t for _, t in target]


class ModuleEMA:
    """Exponential moving average of one module's weights into another's, fused.

    Parameters and buffers are paired once, by name (a mismatch raises naming the first
    offending key), then every :meth:`update` is one fused pass over all of them
    (:func:`ema_update_`: one launch per dtype pair) plus, for copied buffers, one
    ``_foreach_copy_``. The target is mutated in place; the online is only read.

    Args:
        online: the trained module.
        target: the averaged module (same architecture; its parameters are updated in place).
        buffers: floating-point buffers (BatchNorm running statistics) are ``copy``-ed from
            the online, averaged like parameters (``ema``), or left alone (``none``: the target
            keeps its own, as BYOL's reference). Integer buffers (``num_batches_tracked``) are
            copied in ``copy`` and ``ema`` modes, never averaged.
        backend: ``auto`` | ``triton`` | ``torch`` (see :func:`ema_update_`).

    Raises:
        ValueError: parameter or buffer names/shapes differ (the first offending key is
            named), or an unknown ``buffers`` mode or backend.

    Examples:
        MoCo-style key encoder (He et al., 2020: momentum 0.999, BatchNorm statistics
        follow the query encoder)::

            key_encoder = copy.deepcopy(query_encoder).requires_grad_(False)
            ema = ModuleEMA(query_encoder, key_encoder, buffers="copy")
            for x_q, x_k in loader:
                loss = moco_loss(query_encoder(x_q), key_encoder(x_k))
                loss.backward(); opt.step(); opt.zero_grad()
                ema.update(0.999)

        Mean teacher (Tarvainen & Valpola, 2017: the teacher averages the student's weights
        and BatchNorm statistics; momentum ramps up)::

            teacher = copy.deepcopy(student).requires_grad_(False)
            ema = ModuleEMA(student, teacher, buffers="ema")
            for step, (x, y) in enumerate(loader):
                consistency_and_class_loss(student, teacher, x, y).backward(); opt.step(); opt.zero_grad()
                ema.update(min(0.999, (step + 1) / (step + 10)))

        BYOL target (the target keeps its own BatchNorm statistics); a 0-d device tensor as
        momentum keeps the step free of host syncs and CUDA-graph capturable::

            ema = ModuleEMA(online_encoder_and_projector, target, buffers="none")
            tau = torch.empty((), device="cuda")
            ...
            tau.fill_(1 - (1 - 0.996) * (math.cos(math.pi * step / total_steps) + 1) / 2)
            ema.update(tau)

        Runnable in a few lines:

        >>> online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> ema = ModuleEMA(online, target)
        >>> ema.update(0.0)  # momentum 0 copies the online
        >>> torch.equal(target.weight, online.weight)
        True
    """

    def __init__(self, online: nn.Module, target: nn.Module, buffers: str = "copy", backend: str = "auto"):
        if buffers not in BUFFER_MODES:
            raise ValueError(f"ModuleEMA: buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if backend not in BACKENDS:
            raise ValueError(f"ModuleEMA: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.buffers = backend, buffers
        self.online_params, self.target_params = _pairs(
            "parameters", list(online.named_parameters()), list(target.named_parameters()))
        online_bufs, target_bufs = _pairs("buffers", list(online.named_buffers()), list(target.named_buffers()))
        self.ema_sources, self.ema_targets = list(self.online_params), list(self.target_params)
        self.copy_sources, self.copy_targets = [], []
        if buffers != "none":
            for o, t in zip(online_bufs, target_bufs):
                if buffers == "ema" and o.is_floating_point():
                    self.ema_sources.append(o)
                    self.ema_targets.append(t)
                else:
                    self.copy_sources.append(o)
                    self.copy_targets.append(t)

    @torch.no_grad()
    def update(self, momentum: Momentum) -> None:
        """``target ← m·target + (1 − m)·online`` over all paired tensors; buffers per mode.

        Args:
            momentum: a Python float or a 1-element device tensor (read on device).
        """
        ema_update_(self.ema_targets, self.ema_sources, momentum, backend=self.backend)
        if self.copy_targets:
            torch._foreach_copy_(self.copy_targets, self.copy_sources)
