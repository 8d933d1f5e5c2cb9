"""Pair two modules once, update the target from the online every step."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .ema import Momentum, ema_update_

BUFFER_MODES = ("copy", "ema", "none")


def _pairs(kind: str, online: List[Tuple[str, torch.Tensor]], target: List[Tuple[str, torch.Tensor]]):
    if len(online) != len(target):
        raise ValueError(f"ModuleEMA: online has {len(online)} {kind}, target has {len(target)}")
    for (on, o), (tn, t) in zip(online, target):
        if on != tn:
            raise ValueError(f"ModuleEMA: {kind} names differ: online {on!r} vs target {tn!r}")
        if o.shape != t.shape:
            raise ValueError(f"ModuleEMA: {kind[:-1]} {on!r}: online shape {tuple(o.shape)} != target {tuple(t.shape)}")
    return [o for _, o in online], [t for _, t in target]


class ModuleEMA:
    """Exponential moving average of one module's weights into another's, fused.

    Parameters and buffers are paired once, by name (a mismatch raises naming the first
    offending key), then every :meth:`update` is one fused pass over all of them.

    Args:
        online: the trained module.
        target: the averaged module (same architecture; its parameters are updated in place).
        buffers: floating-point buffers (BatchNorm running statistics) are ``copy``-ed from
            the online, averaged like parameters (``ema``), or left alone (``none``: the target
            keeps its own, as BYOL's reference). Integer buffers (``num_batches_tracked``) are
            copied in ``copy`` and ``ema`` modes, never averaged.
        backend: ``auto`` | ``triton`` | ``torch`` (see :func:`ema_update_`).

    Examples:
        MoCo-style key encoder::

            key_encoder = copy.deepcopy(query_encoder).requires_grad_(False)
            ema = ModuleEMA(query_encoder, key_encoder, buffers="copy")
            for images in loader:
                loss = moco_loss(query_encoder(q), key_encoder(k)); loss.backward(); opt.step()
                ema.update(0.999)

        Mean teacher::

            teacher = copy.deepcopy(student).requires_grad_(False)
            ema = ModuleEMA(student, teacher, buffers="ema")
            for step, batch in enumerate(loader):
                ...; opt.step()
                ema.update(min(0.999, (step + 1) / (step + 10)))   # or a 0-d CUDA tensor
    """

    def __init__(self, online: nn.Module, target: nn.Module, buffers: str = "copy", backend: str = "auto"):
        if buffers not in BUFFER_MODES:
            raise ValueError(f"ModuleEMA: buffers must be one of {BUFFER_MODES}, got {buffers!r}")
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
        """``target ← m·target + (1 − m)·online`` over all paired tensors; buffers per mode."""
        ema_update_(self.ema_targets, self.ema_sources, momentum, backend=self.backend)
        if self.copy_targets:
            torch._foreach_copy_(self.copy_targets, self.copy_sources)
