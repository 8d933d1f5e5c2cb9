"""What a training-throughput benchmark runs: the configurations, the modes, one run's context."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from fastbyol.config import AugmentConfig, preset
from fastbyol.data.image_source import ImageSource


@dataclass
class BenchConfig:
    name: str
    backbone: str  # resnet18 | resnet50 | convnet4
    cifar_stem: bool
    image_size: int
    projector_hidden: int
    projection_dim: int
    predictor_hidden: int
    source: str  # "array": CIFAR-like uint8 batches | "jpeg": a JPEG folder on disk
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    peer_blur: Optional[float] = None  # lightly's gaussian_blur prob for both views (None: its defaults)
    jpeg_size: tuple = (500, 375)
    preset: str = "imagenet-resnet50"  # the fastbyol preset the trainer starts from (optimizer, schedules)


def _augment(preset_name: str, size: int) -> AugmentConfig:
    aug = preset(preset_name).augment
    aug.image_size = size
    return aug


def bench_configs() -> Dict[str, BenchConfig]:
    return {
        "cifar-resnet18": BenchConfig("cifar-resnet18", "resnet18", True, 32, 4096, 256, 4096, "array",
                                      _augment("cifar10-resnet18", 32), peer_blur=0.0, preset="cifar10-resnet18"),
        "imagenet-resnet50": BenchConfig("imagenet-resnet50", "resnet50", False, 224, 4096, 256, 4096, "jpeg",
                                         _augment("imagenet-resnet50", 224)),
        # CI: seconds on a 2-core CPU, through the JPEG-folder path ...
        "smoke": BenchConfig("smoke", "convnet4", False, 16, 64, 32, 64, "jpeg", _augment("smoke", 16),
                             peer_blur=0.0, jpeg_size=(40, 30), preset="smoke"),
        # ... and through the CIFAR-batches path (gpu-check --tiny's stand-in for cifar-resnet18).
        "smoke-cifar": BenchConfig("smoke-cifar", "convnet4", False, 16, 64, 32, 64, "array", _augment("smoke", 16),
                                   peer_blur=0.0, preset="smoke"),
    }


MODES = ["fastbyol", "fastbyol-synthetic", "lightly", "byol-pytorch",
         "ablate-torch-loader", "ablate-eager-loss", "ablate-loop-ema", "ablate-loop-lars"]
# Modes a caller may ask for by name although `fastbyol bench` does not run them by default.
EXTRA_MODES = ["lightly-synthetic", "lightly-style", "lightly-style-synthetic", "fastbyol-synthetic-sgd",
               "fastbyol-compile", "fastbyol-synthetic-compile"]
PEERS = ("lightly", "byol-pytorch")


class Skip(Exception):
    """A mode that cannot run here; the message is the reason in the table."""


@dataclass
class Context:
    cfg: BenchConfig
    device: torch.device
    batch: int
    precision: str
    workers: int
    kernels: str  # backend for the fused loss / EMA in the full mode
    source: ImageSource  # its ``root`` is the folder the trainer reads (cfg.data.data)
    seed: int = 0
    allreduce: bool = False  # all-reduce gradients over the default process group (--scaling)
    no_dali_reason: Optional[str] = None  # why the full mode uses the torch loader

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision])
