"""One target line: what is required, what was measured, met / missed / n/a (with why)."""
from __future__ import annotations

from typing import Dict, Optional


def target(name: str, value: Optional[float], limit: float, higher_is_better: bool, unit: str = "",
           na: Optional[str] = None) -> Dict:
    """``na``: why the target does not apply to this run (e.g. a tiny CPU run); the value is still shown."""
    op = ">=" if higher_is_better else "<="
    row = {"target": f"{name} {op} {limit:g}{unit}", "measured": None if value is None else float(value)}
    if na:
        row["verdict"] = f"n/a: {na}"
    elif value is None:
        row["verdict"] = "n/a: not measured"
    else:
        row["verdict"] = "met" if (value >= limit if higher_is_better else value <= limit) else "missed"
    return row
