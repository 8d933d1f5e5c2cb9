"""Per-step schedules (BYOL_SPEC, "Optimisation" and "Target update").

Both are plain functions of the optimizer step, so a resumed run recomputes them exactly.
"""
from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The paper's linear scaling rule: ``lr = base_lr × global_batch / 256``."""
    return base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to 0
    at ``total_steps`` (DeepMind's reference schedule: step 0 has lr 0).

    Examples:
        >>> lr_at(0, 100, 1.0, 10), lr_at(5, 100, 1.0, 10), lr_at(10, 100, 1.0, 10), lr_at(100, 100, 1.0, 10)
        (0.0, 0.5, 1.0, 0.0)
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """Target EMA decay ``τ = 1 − (1 − τ_base)·(cos(π·k/K) + 1)/2``: τ_base at k = 0,
    1 at k = K.

    Examples:
        >>> tau_at(0, 100, 0.996), tau_at(100, 100, 0.996)
        (0.996, 1.0)
    """
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0
