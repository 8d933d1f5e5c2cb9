"""Stopping on a signal, with a checkpoint, the same step on every rank.

SIGTERM (what schedulers and launchers send before killing) or a first Ctrl-C (SIGINT) asks the
trainer to finish the current step, write a checkpoint and exit with :data:`EXIT_CODES`
(143 = 128 + SIGTERM, 130 = 128 + SIGINT, the shell's convention). A second Ctrl-C more than a
second after the first exits at once (130, no checkpoint); the second is debounced because one
Ctrl-C in a terminal reaches a worker twice under ``torchrun`` (from the terminal and forwarded).

With several ranks a signal reaches them at different steps, so they agree through
:class:`StopAgreement`: every ``train.stop_check_every`` steps each rank contributes
``[stop requested, timed checkpoint due]`` to one MAX all-reduce of two numbers, and the result
is acted on ``stop_check_every`` steps later, when every rank reads the same value. On CUDA the
flags travel through pinned memory with non-blocking copies and a CUDA event, so the read waits
only for a collective that finished long ago: no per-step host sync, one 8-byte all-reduce per
``stop_check_every`` steps. The cost is latency: a stop lands 1-2 x ``stop_check_every`` steps
after the signal.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional, Tuple

import torch

from .errors import EXIT_CODES, TrainingStopped  # noqa: F401 (re-exported)

SECOND_CTRL_C_AFTER_S = 1.0


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loading worker processes: a scheduler signals the whole process
    group, and a worker that died of it would crash the step the trainer is finishing; the main
    process stops the workers itself once its checkpoint is written."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopSignals:
    """Installs SIGTERM/SIGINT handlers that record the request (main thread only);
    :meth:`restore` puts the previous handlers back."""

    def __init__(self, announce: bool = True):
        self.requested: Optional[str] = None
        self.announce = announce
        self._since = 0.0
        self._old = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self._since = name, time.monotonic()
            if self.announce:
                extra = " (Ctrl-C again to quit at once, without one)" if name == "SIGINT" else ""
                print(f"fastbyol: {name}: finishing the step and writing a checkpoint{extra}", file=sys.stderr,
                      flush=True)
        elif name == "SIGINT" and time.monotonic() - self._since > SECOND_CTRL_C_AFTER_S:
            print("fastbyol: second Ctrl-C: exiting now, without a checkpoint (exit 130)", file=sys.stderr, flush=True)
            os._exit(EXIT_CODES["SIGINT"])


class StopAgreement:
    """``poll(step, stop, due) -> (stop, due)``, identical on every rank (see the module doc).
    ``stop`` is 0 or the exit code of the signal received (:data:`EXIT_CODES`); the agreed one is
    the largest, so a rank that saw no signal learns which one to report. One rank: the local
    flags, every step, no communication."""

    def __init__(self, world_size: int, device: torch.device, every: int):
        self.world, self.device, self.every = world_size, device, every
        self._pending = None  # (host result tensor, CUDA event or None)
        cuda = device.type == "cuda"
        self._send = torch.zeros(2, pin_memory=cuda)
        self._recv = torch.zeros(2, pin_memory=cuda)

    def poll(self, step: int, stop: int, due: bool) -> Tuple[int, bool]:
        if self.world <= 1:
            return stop, due
        if step % self.every:
            return 0, False
        agreed = (0, False)
        if self._pending is not None:
            result, event = self._pending
            if event is not None:
                event.synchronize()  # the collective was queued `every` steps ago
            agreed = (int(result[0]), bool(result[1] > 0))
        # A timed checkpoint agreed now is written now: do not ask for another one.
        self._issue(stop, due and not agreed[1])
        return agreed

    def _issue(self, stop: int, due: bool) -> None:
        import torch.distributed as tdist

        self._send[0], self._send[1] = float(stop), float(due)
        if self.device.type == "cuda":
            flags = self._send.to(self.device, non_blocking=True)
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
            self._recv.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (self._recv, event)
        else:
            flags = self._send.clone()
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
            self._pending = (flags, None)
