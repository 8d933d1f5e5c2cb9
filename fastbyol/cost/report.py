"""A counted step as per-stage and per-op figures, a text table, JSON and a bar chart."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

from .roofline import DEVICES, describe, op_seconds
from .step import STAGES, StepCost


def summarize(sc: StepCost) -> Dict:
    """Per stage and per (stage, op): launches, bytes read/written, FLOPs, modelled ms per
    device, and each stage's floor and ratio to it. Host→device copies are listed, not summed
    into HBM traffic."""
    stages = {s: {"launches": 0, "bytes_read": 0, "bytes_written": 0, "flops": 0, "transfer_bytes": 0,
                  **{f"ms_{d}": 0.0 for d in DEVICES}} for s in STAGES}
    ops: Dict[tuple, Dict] = defaultdict(lambda: {"launches": 0, "calls": 0, "bytes_read": 0, "bytes_written": 0,
                                                  "flops": 0, **{f"ms_{d}": 0.0 for d in DEVICES}})
    for r in sc.records:
        c, st, op = r.cost, stages[r.stage], ops[(r.stage, r.cost.op)]
        if c.kind == "transfer":
            st["transfer_bytes"] += c.bytes_read
        else:
            for row in (st, op):
                row["bytes_read"] += c.bytes_read
                row["bytes_written"] += c.bytes_written
        for row in (st, op):
            row["launches"] += c.launches
            row["flops"] += c.flops
            for d, dev in DEVICES.items():
                row[f"ms_{d}"] += 1e3 * op_seconds(c, dev, sc.world_size)
        op["calls"] += 1
    for s, row in stages.items():
        floor = sc.floors.get(s)
        moved = row["bytes_read"] + row["bytes_written"]
        row["bytes"] = moved
        row["floor_bytes"] = floor
        row["x_floor"] = round(moved / floor, 2) if floor else None
    total = {k: sum(row[k] for row in stages.values()) for k in ("launches", "bytes_read", "bytes_written", "flops",
                                                                  "bytes", *(f"ms_{d}" for d in DEVICES))}
    op_rows = [{"stage": s, "op": o, **v} for (s, o), v in ops.items()]
    op_rows.sort(key=lambda r: -r[f"ms_{list(DEVICES)[-1]}"])
    cfg = sc.config
    return {
        "what": "modelled cost of one training step (fastbyol cost): no GPU ran",
        "preset": cfg["preset"], "global_batch": cfg["train"]["batch_size"], "micro_batch": sc.micro_batch,
        "world_size": sc.world_size, "precision": cfg["train"]["precision"],
        "channels_last": cfg["train"]["channels_last"], "image_size": cfg["augment"]["image_size"],
        "backbone": cfg["model"]["backbone"], "count_seconds": round(sc.seconds, 2),
        "stages": stages, "total": total, "ops": op_rows, "model": describe(), "notes": sc.notes,
    }


def _gb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def table(summary: Dict, top: int = 15) -> str:
    """Markdown tables: the stages, then the ``top`` costliest ops."""
    devs = list(DEVICES)
    head = (f"Modelled step: {summary['preset']} ({summary['backbone']} @{summary['image_size']}), micro-batch "
            f"{summary['micro_batch']} x {summary['world_size']} GPU(s), {summary['precision']}, channels_last "
            f"{summary['channels_last']} (counted on meta tensors in {summary['count_seconds']} s; no GPU ran)\n\n")
    cols = ["stage", "launches", "read GB", "written GB", "GFLOP", *(f"{d} ms" for d in devs), "floor GB", "x floor"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = list(summary["stages"].items()) + [("**step**", summary["total"])]
    for name, r in rows:
        if name != "**step**" and not r["launches"] and not r["bytes"]:
            continue
        lines.append("| " + " | ".join([name, str(r["launches"]), _gb(r["bytes_read"]), _gb(r["bytes_written"]),
                                          f"{r['flops'] / 1e9:.1f}", *(f"{r[f'ms_{d}']:.2f}" for d in devs),
                                          _gb(r.get("floor_bytes")),
                                          "-" if r.get("x_floor") is None else f"{r['x_floor']:.1f}"]) + " |")
    ops = ["", f"Costliest ops ({devs[-1]} ms):", "",
           "| stage | op | launches | GB moved | GFLOP | " + " | ".join(f"{d} ms" for d in devs) + " |",
           "|" + "---|" * (5 + len(devs))]
    for r in summary["ops"][:top]:
        ops.append(f"| {r['stage']} | {r['op']} | {r['launches']} | {_gb(r['bytes_read'] + r['bytes_written'])} | "
                   f"{r['flops'] / 1e9:.1f} | " + " | ".join(f"{r[f'ms_{d}']:.2f}" for d in devs) + " |")
    a = summary["model"]["assumptions"]
    dev_txt = "; ".join(f"{d}: {v['bandwidth_tb_s']} TB/s, {v['bf16_tflops']:.0f} bf16 TFLOPS"
                        for d, v in summary["model"]["devices"].items())
    foot = ["", f"Assumptions: {dev_txt}; memory efficiency {a['memory_efficiency']}, convolution "
                f"{a['efficiency']['conv']} and matmul {a['efficiency']['matmul']} of peak FLOPs, at least "
                f"{a['min_kernel_us']} us a launch; an op takes {summary['model']['formula']}."]
    foot += [f"Note: {n}." for n in summary["notes"]]
    return head + "\n".join(lines + ops + foot) + "\n"


def bar_chart(summary: Dict, path: str) -> Optional[str]:
    """Modelled ms per stage for each device (None where matplotlib is missing)."""
    from ..monitor import headless_pyplot

    plt = headless_pyplot()
    if plt is None:
        return None
    stages = [s for s, r in summary["stages"].items() if r["launches"] or r["bytes"]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(stages) + 1.5))
    height = 0.8 / len(DEVICES)
    for i, d in enumerate(DEVICES):
        ax.barh([k + i * height for k in range(len(stages))], [summary["stages"][s][f"ms_{d}"] for s in stages],
                height=height, label=d)
    ax.set_yticks([k + height * (len(DEVICES) - 1) / 2 for k in range(len(stages))], stages)
    ax.invert_yaxis()
    ax.set_xlabel("modelled ms per step")
    totals = " / ".join(f"{summary['total'][f'ms_{d}']:.0f} ms ({d})" for d in DEVICES)
    ax.set_title(f"{summary['preset']}, micro-batch {summary['micro_batch']}, {summary['precision']}: {totals}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(summary: Dict, folder: str, name: Optional[str] = None) -> List[str]:
    """``<folder>/<name>.json``, ``.md`` and ``.png``; returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    name = name or (f"cost_{summary['preset']}_b{summary['global_batch']}_{summary['precision']}"
                    + (f"_w{summary['world_size']}" if summary["world_size"] > 1 else ""))
    base = os.path.join(folder, name)
    with open(base + ".json", "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(table(summary, top=25))
    paths = [base + ".json", base + ".md"]
    png = bar_chart(summary, base + ".png")
    return paths + ([png] if png else [])


def regressions(committed: Dict, now: Dict, tolerance: float = 0.10) -> List[tuple]:
    """``(stage, committed bytes, bytes now)`` for every stage whose modelled traffic grew more
    than ``tolerance`` over the committed summary (a stage that was empty counts from 1 MB)."""
    out = []
    for stage, row in now["stages"].items():
        before = committed["stages"].get(stage, {}).get("bytes", 0)
        if row["bytes"] > max(before, 1e6 if not before else 0) * (1 + tolerance):
            out.append((stage, before, row["bytes"]))
    return out
