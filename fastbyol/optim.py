"""LARS (You et al. 2017, as in BYOL's reference), and the optimizer registry.

One LARS step, for a tensor w with gradient g in an adapted group:

    u     = g + wd·w
    trust = η·‖w‖/‖u‖   (1 where either norm is 0)
    buf   = m·buf + trust·u
    w    -= lr·buf

Biases and normalisation parameters (every tensor with ndim ≤ 1) are excluded from both
weight decay and the trust ratio, as in the paper. The step is multi-tensor and host-sync
free: :mod:`fastbyol_kernels.lars`'s two Triton launches per group on a GPU (``backend``, from
``train.kernels``), or its ``torch._foreach_*`` reference (the trust ratios one tensor
computed with ``torch.where``), which is also the CPU path.

The step consumes the gradients, as fused optimizers do: afterwards ``p.grad`` of an adapted
tensor holds ``u = g + wd·w`` (reference) or ``g`` (kernels): unspecified. The reference
computes ``u`` in place, and folding the trust ratio into the momentum update (``addcmul``)
saves two gradient-sized temporaries per step (~40% of the step on CPU); the training loop
zeroes the gradients right after anyway.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List

import torch
from torch import nn

from fastbyol_kernels.lars import lars_step_, lars_trust  # noqa: F401 (lars_trust: re-exported)

from .errors import FastByolError


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with heavy-ball momentum.

    Param groups take ``lars_exclude=True`` to skip weight decay and adaptation
    (see :func:`param_groups`). ``backend``: ``auto`` (the Triton kernels on CUDA tensors),
    ``triton`` or ``torch`` (the ``_foreach`` reference), as ``fastbyol_kernels``.

    Examples:
        >>> opt = LARS(param_groups(model, 1.5e-6), lr=4.8)
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, backend: str = "torch"):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0, trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)
        self.backend = backend

    @torch.no_grad()
    def step(self, closure: Callable = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lars_step_(params, [p.grad for p in params], self._momentum_buffers(params), lr=group["lr"],
                       momentum=group["momentum"], weight_decay=group["weight_decay"],
                       trust_coefficient=group["trust_coefficient"], adapt=not group["lars_exclude"],
                       backend=self.backend)
        return loss

    def _momentum_buffers(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return bufs


def is_excluded(name: str, p: torch.Tensor) -> bool:
    """Biases and normalisation weights: every parameter with at most one dimension."""
    return p.ndim <= 1


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups: adapted/decayed weights, and excluded biases + norm parameters."""
    decay, excluded = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (excluded if is_excluded(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def _lars(groups, lr, o, kernels):
    return LARS(groups, lr=lr, momentum=o.momentum, trust_coefficient=o.trust_coefficient, backend=kernels)


def _sgd(groups, lr, o, kernels):
    return torch.optim.SGD([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups],
                           lr=lr, momentum=o.momentum, foreach=True)


def _adamw(groups, lr, o, kernels):
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups],
                             lr=lr, betas=o.betas, foreach=True)


OPTIMIZERS = {"lars": _lars, "sgd": _sgd, "adamw": _adamw}


def build_optimizer(params: Iterable | nn.Module, optim_cfg, lr: float,
                    kernels: str = "torch") -> torch.optim.Optimizer:
    """The optimizer named by ``optim_cfg.optimizer`` over ``param_groups(model)``; ``kernels``
    (``train.kernels``): LARS's backend."""
    if optim_cfg.optimizer not in OPTIMIZERS:
        raise FastByolError(f"unknown optimizer {optim_cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(params, optim_cfg.weight_decay) if isinstance(params, nn.Module) else list(params)
    return OPTIMIZERS[optim_cfg.optimizer](groups, lr, optim_cfg, kernels)
