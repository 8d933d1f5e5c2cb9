"""Shared benchmark plumbing: device stamp, median timing, copy bandwidth, table, JSON.

A benchmark script picks a device (:func:`pick_device`), times each method with
:func:`time_fn` (medians after warm-up; CUDA events on a GPU, ``perf_counter`` on CPU),
measures the device's copy bandwidth to state a byte floor (:func:`copy_bandwidth`), prints
:func:`markdown_table` and saves :func:`stamp` plus its rows with :func:`write_json`.

Examples:
    >>> dev = pick_device(cpu=True)
    >>> t = time_fn(lambda: torch.ones(1000).sum(), dev, repeats=5)["median_s"]
    >>> path = write_json({**stamp(dev), "rows": [{"method": "sum", "time_us": t * 1e6}]}, "demo.json", "/tmp")
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch



def results_dir() -> str:
    """Where results go by default: ``benchmarks/results`` of the source checkout this package
    runs from; for an installed package (no checkout around it), ``./fastbyol-results``."""
    from .._checkout import checkout_root

    in_checkout = os.path.join(checkout_root(), "benchmarks", "results")
    return in_checkout if os.path.isdir(in_checkout) else os.path.join(os.getcwd(), "fastbyol-results")


RESULTS = results_dir()
L2_FLUSH_BYTES = 256 << 20  # several times any current GPU's L2 (H100: 50 MB)


def stamp(device: torch.device) -> Dict:
    """What ran where: device name, torch/triton/CUDA versions, host, date (UTC)."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int = 50, warmup: int = 5,
            flush_l2: bool = False) -> Dict:
    """Median and quartiles of ``repeats`` timed calls of ``fn`` after ``warmup`` calls, in seconds.

    On CUDA each call sits between two events and all calls are queued before one final
    synchronisation (as ``triton.testing.do_bench`` does): while the host stays ahead of the
    GPU, the events measure GPU time alone; where the host is the bottleneck (many small
    launches), its gaps are part of the time, as they are in training. On CPU: perf_counter.

    Args:
        fn: the work to time; its result is ignored.
        device: where it runs.
        repeats: timed calls.
        warmup: untimed calls first (compilation, caches, allocator).
        flush_l2: CUDA only: overwrite a 256 MB buffer before each call (outside the events),
            so inputs smaller than the L2 cache are read from memory, as in a training step.

    Returns:
        ``{"median_s", "p25_s", "p75_s", "repeats"}``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    if device.type == "cuda":
        scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            if scratch is not None:
                scratch.zero_()
            start.record()
            fn()
            end.record()
        sync(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), statistics.median(times), max(times)]
    return {"median_s": statistics.median(times), "p25_s": q[0], "p75_s": q[2], "repeats": repeats}


def cuda_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` (which may run autograd backward) in a CUDA graph; returns its replay.

    Timing the replay measures the GPU work of ``fn`` without Python or launch overhead:
    what a training step that captures its graph (or whose host runs ahead) pays. Tensors
    ``fn`` allocates (e.g. ``.grad``) then live in the graph's memory pool and are
    overwritten by each replay.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written
    (a ``nbytes``-byte device-to-device copy moves ``2 · nbytes``)."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, repeats=repeats, warmup=3)["median_s"]
    return 2 * a.numel() * 4 / t


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    """Rows (dicts) as a GitHub markdown table of ``columns``; missing values are blank."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(result: Dict, name: str, out_dir: Optional[str] = None) -> str:
    """Write ``result`` to ``out_dir/name`` (default ``benchmarks/results``); returns the path."""
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    return path


def pick_device(cpu: bool) -> torch.device:
    """CUDA when available unless ``cpu`` (smoke mode) is asked for."""
    return torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")


def triton_runs_here(device: torch.device) -> bool:
    """Whether a Triton kernel can run on ``device`` (CPU only under TRITON_INTERPRET=1)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def micro_parser(doc: str) -> argparse.ArgumentParser:
    """The options every micro-benchmark (EMA, loss, LARS) takes; add its own before parsing."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny CPU smoke mode")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return ap


def report(result: Dict, columns: List[str], name: str, out_dir: Optional[str] = None) -> str:
    """Print ``result["rows"]`` as a table and ``result["note"]``, write the JSON to
    ``out_dir/name``; returns its path."""
    print(markdown_table(result["rows"], columns))
    for note in filter(None, (result.get("note") or "").split("; ")):
        print(f"note: {note}")
    path = write_json(result, name, out_dir)
    print(f"wrote {path}")
    return path


def load_byol_pytorch_learner():
    """byol-pytorch's learner module (``byol_pytorch/byol_pytorch.py``) loaded alone: the
    package's ``__init__`` imports its accelerate-based trainer, which the peer comparisons do
    not need. Raises ImportError (one line) when byol-pytorch is missing or does not import."""
    import importlib.util

    spec = importlib.util.find_spec("byol_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("byol-pytorch not installed: pip install --no-deps byol-pytorch==0.9.1 einops==0.8.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "byol_pytorch.py")
    mspec = importlib.util.spec_from_file_location("_byol_pytorch_learner", path)
    mod = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(mod)
    except Exception as e:
        raise ImportError(f"byol-pytorch's learner does not import ({type(e).__name__}: {e})") from None
    return mod
