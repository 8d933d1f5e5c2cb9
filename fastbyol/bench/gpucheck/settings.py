"""What each gpu-check part runs, on a GPU and in ``--tiny`` (CPU, seconds, what CI runs)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List

# Targets (README / DEVELOPERS.md). The throughput ones are stated for one H100.
E2E_IMG_S = 1900.0  # ResNet-50 @224, bf16, end to end
E2E_VS_CEILING = 0.95
VS_LIGHTLY_STYLE = 3.0
EMA_X_FLOOR = 1.15
LOSS_X_FLOOR = 2.0
LOSS_VS_EAGER = 3.0
LARS_X_FLOOR = 1.5
DALI_IMG_S = 5000.0  # both views, ResNet-50 input size


@dataclass
class Part:
    name: str  # what --parts takes
    letter: str  # the part (a-f)
    title: str
    cap_s: float  # its own wall-clock cap (seconds) on a GPU; --tiny uses tiny_cap_s
    tiny_cap_s: float = 120.0


# Order: cheapest and most telling first; torch.compile (minutes of compilation) last but DALI.
PARTS: List[Part] = [
    Part("kernels", "a", "compiled-kernel correctness vs float64", 120),
    Part("micro", "b", "EMA, loss and LARS vs byte floors and eager / _foreach baselines", 90),
    Part("e2e-r50", "c", "end to end, ResNet-50 @224: ceiling, torch loader, lightly-style loop", 150),
    Part("e2e-cifar", "c", "end to end, ResNet-18 CIFAR @32: ceiling, torch loader, lightly-style loop", 60),
    Part("syncs", "e", "host syncs per step (torch.cuda.set_sync_debug_mode)", 45),
    Part("e2e-r50-compile", "c", "end to end, ResNet-50 @224 with torch.compile", 180),
    Part("dali", "f", "DALI pipeline images/s and end to end with DALI", 90),
]
PART_NAMES = [p.name for p in PARTS]


@dataclass
class Settings:
    tiny: bool
    batch: Dict[str, int] = field(default_factory=dict)  # per bench config
    warmup: int = 5
    steps: int = 15
    compile_warmup: int = 3
    precision: str = "bf16"
    kernels: str = "auto"
    workers: int = 0
    configs: Dict[str, str] = field(default_factory=dict)  # part -> fastbyol.bench.train config name
    budget_s: float = 450.0  # the whole run (the issue: <= 8 min on one H100/H200)


def settings(tiny: bool) -> Settings:
    if tiny:  # convnet4 at 16 px through the same code paths (JPEG folder; CIFAR batches)
        return Settings(tiny=True, batch={"smoke": 8, "smoke-cifar": 8}, warmup=1, steps=2, compile_warmup=1,
                        precision="fp32", kernels="torch", workers=0,
                        configs={"e2e-r50": "smoke", "e2e-cifar": "smoke-cifar", "e2e-r50-compile": "smoke",
                                 "syncs": "smoke-cifar", "dali": "smoke"}, budget_s=600.0)
    return Settings(tiny=False, batch={"imagenet-resnet50": 256, "cifar-resnet18": 256}, warmup=5, steps=15,
                    compile_warmup=3, precision="bf16", kernels="auto", workers=min(16, os.cpu_count() or 1),
                    configs={"e2e-r50": "imagenet-resnet50", "e2e-cifar": "cifar-resnet18",
                             "e2e-r50-compile": "imagenet-resnet50", "syncs": "cifar-resnet18",
                             "dali": "imagenet-resnet50"})


class PartSkip(Exception):
    """A part that cannot run here (no CUDA, DALI not installed, ...): the message is the reason."""
