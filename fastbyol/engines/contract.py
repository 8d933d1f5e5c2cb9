"""The contract every engine meets, and the pieces both engines share.

An engine runs the optimisation step; the trainer does not care which one. Two implement
:class:`Engine`: :class:`~fastbyol.engines.local.LocalEngine` (one process: autocast, fp16 loss
scaling, gradient accumulation) and :class:`~fastbyol.engines.deepspeed_engine.DeepSpeedEngine`
(DeepSpeed on one or many ranks).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Optional, Protocol

import torch
from torch import nn


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


class StepSeen:
    """Whether ``optimizer.step()`` ran since :meth:`clear` (a post-step hook: no device read).
    GradScaler skips the optimizer's step on overflow, so this tells a skipped fp16 step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.seen = False
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.seen = True

    def clear(self) -> None:
        self.seen = False


class Engine(Protocol):
    """What the trainer calls, once per micro-batch and once per optimizer step.

    * ``module``: the online network to call (possibly wrapped);
    * ``autocast()``: the precision context for the forward pass;
    * ``backward(loss)``: one micro-batch's backward;
    * ``step() -> bool``: called after every micro-batch; True only when an optimizer step was
      applied (an accumulation boundary that fp16 loss scaling did not skip). The target
      update and the schedules advance on True alone;
    * ``set_lr(lr)``; ``ema_source()``: the modules whose fp32 weights the target averages;
    * ``save(path, state, keep_last, final)`` / ``load(path, state=None) -> state``: checkpoints including
      optimizer state (``state``: the already-read ``checkpoint.pt``, so it is not read twice).
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer

    def autocast(self) -> ContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> bool: ...

    def set_lr(self, lr: float) -> None: ...

    def ema_source(self) -> nn.Module: ...

    def save(self, path: str, state: Dict[str, Any], keep_last: int = 0, final: bool = False) -> None: ...

    def load(self, path: str, state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]: ...
