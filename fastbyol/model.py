"""BYOL in one screen (Grill et al. 2020; BYOL_SPEC).

online:  p = q(g(f(v)))        target:  z' = g_ξ(f_ξ(v'))   (no gradients, EMA of online)
loss:    mean_i [ (2 − 2·cos(p1_i, z'2_i)) + (2 − 2·cos(p2_i, z'1_i)) ]
update:  ξ ← τ·ξ + (1 − τ)·θ after every optimizer step, τ on a cosine schedule to 1.

The loss and the target update are the fused kernels of ``fastbyol_kernels`` (plain PyTorch
references on CPU); this file is the whole algorithm around them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .backbones import HiddenLayer, build_encoder, feature_dim


class MLPHead(nn.Sequential):
    """BYOL projector / predictor: ``Linear(d, h) → BatchNorm1d → ReLU → Linear(h, out)``.

    Examples:
        >>> head = MLPHead(2048, 4096, 256)
        >>> head(torch.randn(8, 2048)).shape
        torch.Size([8, 256])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class OnlineNetwork(nn.Module):
    """Encoder f, projector g, predictor q: the trained network (DeepSpeed's engine model)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.projector, self.predictor = encoder, projector, predictor

    def forward(self, x: torch.Tensor):
        z = self.projector(self.encoder(x))
        return self.predictor(z), z


class TargetNetwork(nn.Module):
    """Encoder f_ξ and projector g_ξ: same shapes as the online ones, never optimised."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


@dataclass
class BYOLOutput:
    loss: torch.Tensor  # scalar, the symmetric BYOL loss
    z: torch.Tensor  # online projections of view 1 (detached; the collapse monitor reads them)


def online_pairs(online: OnlineNetwork):
    """The online modules the target averages (encoder, projector), in target order."""
    return nn.ModuleList([online.encoder, online.projector])


class BYOL(nn.Module):
    """Online and target networks around any encoder.

    Args:
        encoder: a backbone name (``resnet18|resnet34|resnet50|convnet4``) or any
            ``nn.Module``; for a module, ``hidden_layer`` picks the feature layer (see
            :class:`~fastbyol.backbones.HiddenLayer`).
        use_momentum: ``False`` gives the SimSiam-style target: the online encoder and
            projector with stop-gradient, no EMA.
        views_in_one_batch: forward both views as one ``2B`` batch (byol-pytorch's way; BatchNorm
            statistics are then over both views) instead of one forward per view (the reference).
        loss_fn: ``(p1, p2, z1, z2) -> scalar``; defaults to the fused
            :func:`fastbyol_kernels.byol_loss`.

    The target runs in train mode like the reference, so its BatchNorm layers use batch
    statistics and keep their own running averages.

    Examples:
        >>> model = BYOL("resnet18", cifar_stem=True)
        >>> out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
        >>> out.loss.backward(); model.update_target(0.99)
    """

    def __init__(self, encoder: Union[str, nn.Module] = "resnet50", *, cifar_stem: bool = False,
                 hidden_layer: Union[str, int, None] = None, image_size: int = 32,
                 projector_hidden: int = 4096, projection_dim: int = 256, predictor_hidden: int = 4096,
                 use_momentum: bool = True, loss_fn=None, views_in_one_batch: bool = False):
        super().__init__()
        if isinstance(encoder, str):
            encoder, dim = build_encoder(encoder, cifar_stem)
        else:
            encoder = HiddenLayer(encoder, hidden_layer)
            dim = feature_dim(encoder, image_size)
        self.feature_dim = dim
        projector = MLPHead(dim, projector_hidden, projection_dim)
        predictor = MLPHead(projection_dim, predictor_hidden, projection_dim)
        self.online = OnlineNetwork(encoder, projector, predictor)
        self.use_momentum, self.views_in_one_batch = use_momentum, views_in_one_batch
        self.target: Optional[TargetNetwork] = (
            TargetNetwork(copy.deepcopy(encoder), copy.deepcopy(projector)) if use_momentum else None)
        if loss_fn is None:
            from fastbyol_kernels import byol_loss as loss_fn
        self.loss_fn = loss_fn
        self._ema = None

    def target_forward(self, x: torch.Tensor, z_online: torch.Tensor) -> torch.Tensor:
        if self.target is None:  # SimSiam: stop-gradient on the online projection
            return z_online.detach()
        return self.__dict__.get("_compiled_target", self.target)(x)

    def compile_target(self) -> None:
        """Run the target's forwards through ``torch.compile`` (``--train.compile``). The
        compiled wrapper is kept outside the module tree, so state dicts and the EMA pairing
        still see ``self.target`` itself."""
        if self.target is not None:
            self.__dict__["_compiled_target"] = torch.compile(self.target)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, online: Optional[nn.Module] = None) -> BYOLOutput:
        """Symmetric BYOL loss of two batches of views. ``online`` overrides ``self.online``
        (a DeepSpeed engine wrapping it)."""
        online = online if online is not None else self.online
        if self.views_in_one_batch:  # byol-pytorch: one forward, statistics over both views
            both = torch.cat((v1, v2))
            p, z = online(both)
            (p1, p2), (z1, _), (t1, t2) = p.chunk(2), z.chunk(2), self.target_forward(both, z).chunk(2)
        else:  # one forward per view, as the reference: BatchNorm statistics are per view
            p1, z1 = online(v1)
            p2, z2 = online(v2)
            t1 = self.target_forward(v1, z1)
            t2 = self.target_forward(v2, z2)
        loss = self.loss_fn(p1, p2, t1, t2)
        return BYOLOutput(loss=loss, z=z1.detach())

    def ema(self, buffers: str = "none", backend: str = "auto", source: Optional[OnlineNetwork] = None):
        """The (cached) :class:`fastbyol_kernels.ModuleEMA` pairing online (or ``source``,
        e.g. an engine's fp32 master copy) → target. ``buffers``: ``none`` keeps the
        target's own BatchNorm statistics (the reference), ``ema`` averages, ``copy`` copies."""
        if self._ema is None:
            from fastbyol_kernels import ModuleEMA

            src = source if source is not None else self.online
            self._ema = ModuleEMA(online_pairs(src), nn.ModuleList([self.target.encoder, self.target.projector]),
                                  buffers=buffers, backend=backend)
        return self._ema

    @torch.no_grad()
    def update_target(self, tau: Union[float, torch.Tensor], buffers: str = "none", backend: str = "auto",
                      source: Optional[OnlineNetwork] = None) -> None:
        """ξ ← τ·ξ + (1 − τ)·θ over encoder + projector, in one fused pass."""
        if self.target is not None:
            self.ema(buffers, backend, source).update(tau)

    def encoder(self) -> nn.Module:
        """The online encoder: the network kept after pretraining."""
        return self.online.encoder
