"""Encoders: torchvision ResNets by name (optionally with a CIFAR stem), a tiny convnet for
CPU runs, and any user ``nn.Module`` whose feature layer is picked by name or detected."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from .errors import FastByolError

RESNET_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def resnet(name: str, cifar_stem: bool = False) -> Tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (``fc`` = Identity), output ``[B, d]``.

    With ``cifar_stem`` the first conv is 3×3 stride 1 and the max-pool is dropped, for 32 px
    inputs. Module names stay torchvision's, so ``export`` yields a loadable state_dict.
    """
    import torchvision

    if name not in RESNET_DIMS:
        raise FastByolError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNET_DIMS)}")
    net = getattr(torchvision.models, name)(weights=None, zero_init_residual=True)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, RESNET_DIMS[name]


class ConvNet4(nn.Module):
    """Four conv-BN-ReLU blocks and global average pooling (output ``[B, 256]``).

    Small enough to learn something in CPU minutes; used by the ``default`` and ``smoke``
    presets, never by the paper's.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class HiddenLayer(nn.Module):
    """Wrap a user network and return the (flattened) output of one of its layers.

    ``layer`` is a module name from ``named_modules()`` or an index into ``children()``;
    ``None`` picks the input of the last ``nn.Linear`` child (a classifier head, as
    ResNet's ``fc``), or the network's own output when it has none.
    """

    def __init__(self, net: nn.Module, layer: Union[str, int, None] = None):
        super().__init__()
        self.net = net
        self._take_input = False
        if layer is None:
            children = list(net.named_children())
            if children and isinstance(children[-1][1], nn.Linear):
                layer, self._take_input = children[-1][0], True
        if isinstance(layer, int):
            children = list(net.named_children())
            if not -len(children) <= layer < len(children):
                raise FastByolError(f"hidden layer index {layer} out of range ({len(children)} children)")
            layer = children[layer][0]
        self.layer = layer
        if layer is not None:
            modules = dict(net.named_modules())
            if layer not in modules:
                raise FastByolError(f"hidden layer {layer!r} not found; modules: {', '.join(list(modules)[1:8])}...")
            modules[layer].register_forward_hook(self._hook)
        self._out: Optional[torch.Tensor] = None

    def _hook(self, module, inputs, output):
        self._out = inputs[0] if self._take_input else output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.layer is not None:
            out, self._out = self._out, None
        return out.flatten(1)


def feature_dim(encoder: nn.Module, image_size: int = 32) -> int:
    """Output width of an encoder, found with one dummy forward in eval mode."""
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        p = next(encoder.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        d = encoder(torch.zeros(2, 3, image_size, image_size, device=dev)).shape[1]
    encoder.train(was_training)
    return d


def build_encoder(name: str, cifar_stem: bool = False) -> Tuple[nn.Module, int]:
    """An encoder by config name: ``resnet18|resnet34|resnet50|convnet4``."""
    if name == "convnet4":
        net = ConvNet4()
        return net, net.out_dim
    return resnet(name, cifar_stem)


def first_feature_map_side(backbone: str, cifar_stem: bool, image_size: int) -> int:
    """Side of the encoder's first feature map: ResNet's ImageNet stem (stride-2 7×7 conv,
    stride-2 max-pool) divides the input by 4; the CIFAR stem and ConvNet4 keep it."""
    return image_size if cifar_stem or backbone == "convnet4" else image_size // 4


def memory_format(cfg, device: torch.device) -> torch.memory_format:
    """The layout the encoder and its inputs use (``cfg.train.channels_last``).

    ``auto``: channels_last on CUDA (tensor-core convolutions). On CPU, oneDNN's channels-last
    convolutions win on large feature maps and lose on small ones (2 cores, ResNet-18 forward
    + backward: 13% faster with the CIFAR stem at 32 px, 10% slower with the ImageNet stem at
    32 px, whose maps start at 8×8), so only from a 32 px first feature map up.
    """
    choice = cfg.train.channels_last
    if choice == "auto":
        m = cfg.model
        on = device.type == "cuda" or first_feature_map_side(m.backbone, m.cifar_stem, cfg.augment.image_size) >= 32
    else:
        on = choice == "on"
    return torch.channels_last if on else torch.contiguous_format


def memory_format_of(module: nn.Module) -> torch.memory_format:
    """The layout of a module's first 4-D weight (its inputs should match)."""
    for p in module.parameters():
        if p.dim() == 4:
            return torch.channels_last if not p.is_contiguous() and p.is_contiguous(
                memory_format=torch.channels_last) else torch.contiguous_format
    return torch.contiguous_format
