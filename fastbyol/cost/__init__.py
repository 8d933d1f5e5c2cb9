"""``fastbyol cost``: what a training step costs on a GPU, counted without one.

:func:`step_cost` runs the trainer's real step on ``meta`` tensors under a counter
(:mod:`.counter`), :func:`~.report.summarize` turns it into per-stage and per-op figures with a
roofline time for H100 and H200 (:mod:`.roofline`), :mod:`.report` prints and saves them.

Examples:
    >>> from fastbyol.config import preset
    >>> ms = modelled_stage_ms(preset("smoke"))  # doctest: +SKIP
    >>> ms["forward"]  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Dict

from ..config import Config
from .report import summarize
from .step import STAGES, StepCost, step_cost


def modelled_stage_ms(cfg: Config, device: str = "H200", world_size: int = 1) -> Dict[str, float]:
    """Modelled milliseconds of each stage of one step of ``cfg`` on ``device`` (``H100`` |
    ``H200``), plus ``"step"``: what ``fastbyol gpu-check`` puts next to its measurements."""
    summary = summarize(step_cost(cfg, world_size))
    out = {s: row[f"ms_{device}"] for s, row in summary["stages"].items()}
    out["step"] = summary["total"][f"ms_{device}"]
    return out


__all__ = ["STAGES", "StepCost", "modelled_stage_ms", "step_cost", "summarize"]
