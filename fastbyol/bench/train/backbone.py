"""The encoder the peers train: the architecture fastbyol builds, as a plain module (shared by
the peer packages' modes and the torch-only lightly loop)."""
from __future__ import annotations

from torch import nn

from .configs import BenchConfig


def peer_backbone(cfg: BenchConfig):
    """The same encoder architecture fastbyol builds, as a plain torchvision module (or
    ConvNet4), for the peers. ``(module, feature_dim)``."""
    import torchvision

    if cfg.backbone == "convnet4":
        from fastbyol.backbones import ConvNet4

        net = ConvNet4()
        return net, net.out_dim
    net = getattr(torchvision.models, cfg.backbone)()
    if cfg.cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, net.fc.in_features
