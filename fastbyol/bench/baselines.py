"""The common way to write BYOL's target update and LARS, one tensor at a time: the
baselines fastbyol's multi-tensor versions are measured against (lightly's
``update_momentum``, byol-pytorch, solo-learn's LARS). Same maths as
:class:`fastbyol_kernels.ModuleEMA` (buffers ``none``) and :class:`fastbyol.optim.LARS`.
"""
from __future__ import annotations

import torch
from torch import nn


class PerParameterEMA:
    """``ξ ← τ·ξ + (1 − τ)·θ`` over the parameters: two kernels and one Python iteration per tensor."""

    def __init__(self, online: nn.Module, target: nn.Module):
        self.pairs = list(zip(target.parameters(), online.parameters()))

    @torch.no_grad()
    def update(self, tau: float) -> None:
        for t, o in self.pairs:
            t.mul_(tau).add_(o.detach(), alpha=1 - tau)


class PerParameterLARS(torch.optim.Optimizer):
    """LARS per tensor: two norm kernels, a ``torch.where`` trust ratio (no host sync), then the
    momentum and weight update. Groups take ``lars_exclude`` as in :func:`fastbyol.optim.param_groups`."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if not group["lars_exclude"]:
                    u = u.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    u = u.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(u)
                p.add_(buf, alpha=-group["lr"])
