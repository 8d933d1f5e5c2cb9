"""One process: autocast forward, GradScaler for fp16, accumulation over micro-batches."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..checkpoint import load_checkpoint, write_checkpoint
from ..errors import FastByolError
from .contract import StepSeen, autocast_context


class LocalEngine:
    """One process: autocast forward, GradScaler for fp16, accumulation over micro-batches."""

    def __init__(self, online: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", grad_accum: int = 1, compile: bool = False):
        self.online, self.optimizer, self.device = online, optimizer, device
        self.precision, self.grad_accum = precision, grad_accum
        self.module = torch.compile(online) if compile else online
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self._micro = 0
        self._stepped = StepSeen(optimizer)

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum if self.grad_accum > 1 else loss
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> bool:
        self._micro += 1
        if self._micro % self.grad_accum:
            return False
        if self.scaler is None:
            self.optimizer.step()
            applied = True
        else:
            # GradScaler.step reads found-inf on the host (torch's one sync per fp16 step) and
            # calls optimizer.step() only without overflow: whether it did is the answer, no
            # further read (reading the scale before and after cost two more full drains).
            self._stepped.clear()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self._stepped.seen
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def ema_source(self) -> nn.Module:
        return self.online

    def save(self, path: str, state: Dict[str, Any], keep_last: int = 0, final: bool = False) -> None:
        state = dict(state, optimizer=self.optimizer.state_dict(), optimizer_class=type(self.optimizer).__name__,
                     scaler=self.scaler.state_dict() if self.scaler is not None else None)
        write_checkpoint(state, path, keep_last)

    def load(self, path: str, state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        state = load_checkpoint(path) if state is None else state
        saved, mine = state.get("optimizer_class"), type(self.optimizer).__name__
        if saved != mine:
            raise FastByolError(f"cannot resume {path!r}: it was trained with {saved}, this run uses {mine}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise FastByolError(f"cannot resume {path!r}: its optimizer state does not fit this run ({e})") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return state
