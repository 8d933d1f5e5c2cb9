"""Shared benchmark plumbing: device stamp, median timing, copy bandwidth, table, JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def stamp(device: torch.device) -> Dict:
    """What ran where: device name, versions, date."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int = 50, warmup: int = 5) -> Dict:
    """Median (and quartiles) of ``repeats`` timed calls after ``warmup``, in seconds.
    CUDA: events around each call; CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), statistics.median(times), max(times)]
    return {"median_s": statistics.median(times), "p25_s": q[0], "p75_s": q[2], "repeats": repeats}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, repeats=repeats, warmup=3)["median_s"]
    return 2 * a.numel() * 4 / t


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(result: Dict, name: str, out_dir: Optional[str] = None) -> str:
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    return path


def pick_device(cpu: bool) -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")


def triton_runs_here(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
