"""Timing: a fresh runner per segment, warm-up then timed steps (each from asking for the batch
to the finished target update, synchronised), modes alternating over rounds."""
from __future__ import annotations

import gc
import statistics
import time
import traceback
from typing import Dict, List, Optional

import torch

from fastbyol.bench.common import sync

from .configs import Context, Skip
from .fastbyol_runner import FastByolRunner, Runner
from .lightly_style import LightlyStyleRunner
from .peers import ByolPytorchRunner, LightlyRunner


class LoaderOnly(Runner):
    """A mode's loader alone (decode + augment, the batch on the device), no model step: what
    the loader can feed, to set beside the compute on pre-made views and the two together."""

    def __init__(self, runner: Runner):
        self.runner, self.online_params = runner, runner.online_params
        self.details = dict(runner.details, step="none: the loader alone")

    def batches(self):
        return self.runner.batches()

    def step(self, batch) -> None:
        pass

    def close(self) -> None:
        self.runner.close()


LOADER_ONLY = {f"{loop}-loader": loop for loop in ("fastbyol", "lightly-style", "lightly")}


def build_runner(mode: str, ctx: Context, full_loader: str) -> Runner:
    if mode in LOADER_ONLY:
        return LoaderOnly(build_runner(LOADER_ONLY[mode], ctx, full_loader))
    compile = mode.endswith("-compile")
    base = mode[: -len("-compile")] if compile else mode
    if base == "fastbyol":
        return FastByolRunner(ctx, loader=full_loader, compile=compile)
    if base == "fastbyol-synthetic":
        return FastByolRunner(ctx, loader="synthetic", compile=compile)
    if mode == "fastbyol-synthetic-nchw":  # channels_last off: the layout's share of the compute ratio
        return FastByolRunner(ctx, loader="synthetic", channels_last="off")
    if mode == "fastbyol-synthetic-sgd":
        return FastByolRunner(ctx, loader="synthetic", lars="sgd")
    if mode == "lightly":
        return LightlyRunner(ctx)
    if mode == "lightly-synthetic":
        return LightlyRunner(ctx, synthetic=True)
    if mode == "lightly-style":
        return LightlyStyleRunner(ctx)
    if mode == "lightly-style-synthetic":
        return LightlyStyleRunner(ctx, synthetic=True)
    if mode == "byol-pytorch":
        return ByolPytorchRunner(ctx)
    if mode == "ablate-torch-loader":
        if full_loader == "torch":
            raise Skip(f"the full mode already uses the torch loader ({ctx.no_dali_reason})")
        return FastByolRunner(ctx, loader="torch")
    if mode == "ablate-eager-loss":
        return FastByolRunner(ctx, loader=full_loader, loss="eager")
    if mode == "ablate-loop-ema":
        return FastByolRunner(ctx, loader=full_loader, ema="loop")
    if mode == "ablate-loop-lars":
        return FastByolRunner(ctx, loader=full_loader, lars="loop")
    raise ValueError(f"unknown mode {mode!r}")


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_segment(mode: str, ctx: Context, full_loader: str, warmup: int, steps: int) -> Dict:
    """Build a fresh runner, run ``warmup`` untimed and ``steps`` timed steps (each timed from
    asking for the batch to the finished target update, synchronised), tear it down."""
    free_device_memory(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    runner = build_runner(mode, ctx, full_loader)
    it = runner.batches()
    times: List[float] = []
    try:
        t_start = None
        for i in range(warmup + steps):
            if i == warmup:
                sync(ctx.device)
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            batch = next(it)
            runner.step(batch)
            sync(ctx.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
    finally:
        it.close()
        runner.close()
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30 if ctx.device.type == "cuda" else None
    grad_bytes = sum(p.numel() * 4 for p in runner.online_params)  # fp32 gradients
    details = runner.details
    del runner, it
    free_device_memory(ctx.device)
    return {"times": times, "wall": wall, "peak_mem_gib": peak, "details": details, "grad_bytes": grad_bytes}


def summarise(times: List[float], walls: List[float], batch: int, score: str = "median") -> Dict:
    """``score="wall"``: ``img_s`` is images over the timed window's wall clock (sustained: a
    loader that falls behind shows once its prefetched batches are spent), the median step's
    rate stays as ``img_s_median``; ``"median"``: ``img_s`` is the median step's."""
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    wall = batch * len(times) / sum(walls)
    out = {"img_s": batch / med, "img_s_mean": wall, "step_ms": med * 1e3,
           "step_ms_p25": q[0] * 1e3, "step_ms_p75": q[2] * 1e3, "timed_steps": len(times)}
    if score == "wall":
        out = {"img_s": wall, "img_s_median": batch / med, **{k: v for k, v in out.items() if k not in
                                                              ("img_s", "img_s_mean")}}
    return out


def measure(modes: List[str], ctx: Context, full_loader: str, warmup: int, steps: int, rounds: int,
            log=print, deadline: Optional[float] = None) -> Dict[str, Dict]:
    """Every mode for ``rounds`` segments, alternating modes within each round (drifts of
    clock, temperature or background load spread over all modes instead of one)."""
    acc: Dict[str, Dict] = {m: {"times": [], "walls": [], "peak": None, "round_medians": []} for m in modes}
    for r in range(rounds):
        for m in modes:
            a = acc[m]
            if "skipped" in a:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                a.setdefault("skipped", "skipped: the part's time cap was reached before this mode")
                log(f"  {m:<22} {a['skipped']}")
                continue
            try:
                seg = run_segment(m, ctx, full_loader, warmup, steps)
            except Skip as e:
                a["skipped"] = f"skipped: {e}"
                log(f"  {m:<22} {a['skipped']}")
                continue
            except Exception as e:  # a broken mode is a row of the table, not the end of the run
                traceback.print_exc()
                a["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                log(f"  {m:<22} {a['skipped']}")
                continue
            a["times"] += seg["times"]
            a["round_medians"].append(statistics.median(seg["times"]))
            a["walls"].append(seg["wall"])
            a["details"], a["grad_bytes"] = seg["details"], seg["grad_bytes"]
            if seg["peak_mem_gib"] is not None:
                a["peak"] = max(a["peak"] or 0.0, seg["peak_mem_gib"])
            log(f"  {m:<22} round {r + 1}/{rounds}: median step {statistics.median(seg['times']) * 1e3:8.1f} ms "
                f"({ctx.batch / statistics.median(seg['times']):8.1f} img/s)")
    return acc
