"""Parts c, e and f: whole training steps through fastbyol.bench.train. The fastbyol rows are
``Trainer.train_micro_batch`` of a real Trainer (fastbyol.bench.train.fastbyol_runner); the baseline is
lightly's BYOL example loop written out in torch (fastbyol.bench.train.lightly_style), same device, same
run, modes one after another on the same images."""
from __future__ import annotations

import warnings
from typing import Dict, List

import torch

from fastbyol.bench.train.configs import Context, bench_configs
from fastbyol.bench.train.data import build_source
from fastbyol.bench.train.fastbyol_runner import FastByolRunner, dali_import_error
from fastbyol.bench.train.timing import measure, summarise

from . import settings as S
from .settings import PartSkip
from .targets import target

# Per loop: compute alone (pre-made views), the loader alone (decode + augment, no model), end to end.
E2E_MODES = ["fastbyol-synthetic", "fastbyol-synthetic-nchw", "fastbyol-loader", "fastbyol", "lightly-style-synthetic", "lightly-style-loader",
             "lightly-style", "lightly-synthetic", "lightly-loader", "lightly"]
COMPILE_MODES = ["fastbyol-synthetic-compile", "fastbyol-compile"]


def _context(pc, part: str, extra_steps: int = 0) -> Context:
    s = pc.settings
    name = s.configs[part]
    cfg, batch = bench_configs()[name], s.batch[name]
    # The trainer holds out a tenth for kNN; no timed segment may cross an epoch.
    # The largest batch any mode's loader hands over: the lightly-style loop's two float32 views.
    budget = S.loader_budget(s.workers, s.prefetch, batch * 2 * 3 * cfg.image_size ** 2 * 4)
    pc.loader = budget
    if budget["note"]:
        pc.log(f"[{part}] {budget['note']}")
    steps = S.sustained_steps(s.steps, budget["workers"], s.prefetch)
    n = int(batch * (s.warmup + steps + extra_steps + 1) / 0.9) + 1
    pc.log(f"[{part}] {name}: batch {batch}, {n} generated images ({cfg.source}), {budget['workers']} workers, "
           f"{steps} timed steps")
    source = build_source(cfg, n, None, pc.cache)
    ctx = Context(cfg, pc.device, batch, s.precision, budget["workers"], s.kernels, source, seed=0,
                  no_dali_reason="gpu-check: part c times the torch loader, part f DALI")
    pc.timed_steps = steps
    return ctx


def _rows(acc: Dict, modes: List[str], ctx: Context, warmup: int) -> List[Dict]:
    rows = []
    for m in modes:
        a = acc[m]
        row = {"config": ctx.cfg.name, "batch": ctx.batch, "mode": m, "warmup": warmup}
        if "skipped" in a:
            row["status"] = a["skipped"]
        else:
            row.update(status="ok", **summarise(a["times"], a["walls"], ctx.batch, score="wall"), peak_mem_gib=a["peak"],
                       details=a["details"])
        rows.append(row)
    return rows


def _measure(pc, part: str, modes: List[str], warmup: int) -> Dict:
    ctx = _context(pc, part, extra_steps=max(0, warmup - pc.settings.warmup))
    rows: List[Dict] = []
    for m in modes:  # one mode at a time, so a cap or a crash keeps the rows before it
        # Compute alone on pre-made views has no backlog of prefetched batches to drain: the short
        # window suffices there; a loader in the loop gets the sustained one.
        steps = pc.settings.steps if "synthetic" in m else pc.timed_steps
        acc = measure([m], ctx, "torch", warmup, steps, 1, log=pc.log, deadline=pc.deadline)
        rows += _rows(acc, [m], ctx, warmup)
        _vs_ceiling(rows)
        pc.save({"rows": rows, "loader": pc.loader})
    return {"rows": rows, "ctx": ctx}


def _vs_ceiling(rows: List[Dict]) -> None:
    """End to end ÷ the same step on pre-made views (the data pipeline's cost)."""
    by = {r["mode"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        base = {"fastbyol": "fastbyol-synthetic", "fastbyol-compile": "fastbyol-synthetic-compile"}.get(r["mode"])
        if r["status"] == "ok" and base in by:
            r["vs_ceiling"] = r["img_s"] / by[base]["img_s"]


def _binds(rows: List[Dict]) -> Dict[str, str]:
    """Per loop: which of loader and compute is the slower, i.e. binds end to end."""
    by = {r["mode"]: r for r in rows if r["status"] == "ok"}
    out = {}
    for loop in ("fastbyol", "lightly-style", "lightly"):
        load, comp = by.get(f"{loop}-loader"), by.get(f"{loop}-synthetic")
        if load and comp:
            out[loop] = (f"loader ({load['img_s']:.0f} img/s alone < compute {comp['img_s']:.0f})"
                         if load["img_s"] < comp["img_s"] else
                         f"compute ({comp['img_s']:.0f} img/s alone <= loader {load['img_s']:.0f})")
    return out


def _get(rows: List[Dict], mode: str):
    return next((r for r in rows if r["mode"] == mode and r["status"] == "ok"), None)


def part_e2e(pc, part: str) -> Dict:
    res = _measure(pc, part, E2E_MODES, pc.settings.warmup)
    rows = res["rows"]
    out = {"rows": rows, "targets": [], "loader": pc.loader, "binds": _binds(rows),
           "notes": ["img_s: images over the wall clock of the sustained timed window (img_s_median: the median "
                     "step's rate); -synthetic: compute alone on pre-made views; -loader: decode + augment alone, "
                     "no model"] + ([pc.loader["note"]] if pc.loader.get("note") else [])}
    if part == "e2e-r50":
        na = "a tiny CPU run (the targets are for ResNet-50 on one H100)" if pc.settings.tiny else None
        full = _get(rows, "fastbyol")
        out["targets"] = [
            target("ResNet-50 e2e images/s (torch loader)", full and full["img_s"], S.E2E_IMG_S, True, "", na),
            target("ResNet-50 e2e / ceiling", full and full.get("vs_ceiling"), S.E2E_VS_CEILING, True, "", na)]
    return out


def part_compile(pc) -> Dict:
    if pc.settings.tiny:
        raise PartSkip("tiny: torch.compile builds C++ kernels for minutes on a CPU; it runs on a GPU")
    res = _measure(pc, "e2e-r50-compile", COMPILE_MODES, pc.settings.compile_warmup)
    full = _get(res["rows"], "fastbyol-compile")
    return {"rows": res["rows"], "notes": ["warm-up steps include the compilation; timed steps do not"],
            "targets": [target("ResNet-50 e2e images/s, torch.compile (torch loader)", full and full["img_s"],
                               S.E2E_IMG_S, True)]}


def count_syncs(fn, n: int) -> Dict:
    """Host syncs in ``n`` calls of ``fn``, as torch.cuda.set_sync_debug_mode('warn') reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where: Dict[str, int] = {}
    for w in syncs:
        key = f"{w.filename}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return {"syncs": len(syncs), "steps": n, "per_step": len(syncs) / n, "where": where}


def part_syncs(pc) -> Dict:
    if pc.device.type != "cuda":
        raise PartSkip("torch.cuda.set_sync_debug_mode counts CUDA host syncs: nothing to count on a CPU run")
    ctx = _context(pc, "syncs")
    rows, n = [], 5
    for loader in ("synthetic", "torch"):
        runner = FastByolRunner(ctx, loader=loader)
        it = runner.batches()
        try:
            for _ in range(pc.settings.warmup):  # cudnn autotuning and lazy init may sync: not per step
                runner.step(next(it))
            step_only = count_syncs(lambda b=next(it): runner.step(b), n)  # one batch, fetched before counting
            with_loader = count_syncs(lambda: runner.step(next(it)), n)
        finally:
            it.close()
            runner.close()
        rows.append({"what": f"Trainer.train_micro_batch ({loader} views)", **step_only})
        rows.append({"what": f"next(loader) + Trainer.train_micro_batch ({loader} views)", **with_loader})
        pc.save({"rows": rows})
    step = rows[0]
    return {"rows": rows, "targets": [target("host syncs per training step (train_micro_batch)", step["per_step"],
                                             0, False)]}


def part_dali(pc) -> Dict:
    err = dali_import_error()
    if err:
        raise PartSkip(err)
    from fastbyol.bench.pipeline import images_per_second
    from fastbyol.data.dali import DaliTwoViewLoader

    ctx = _context(pc, "dali")
    s, na = pc.settings, ("DALI's CPU backend in a tiny run" if pc.settings.tiny else None)
    batches = max(1, min(20, len(ctx.source) // ctx.batch - 2))
    rows = []
    for fancy in (True, False):  # False may let nvJPEG use the hardware JPEG decoder
        got = images_per_second(lambda: DaliTwoViewLoader(ctx.source, ctx.cfg.augment, ctx.batch, ctx.device,
                                                          workers=max(2, ctx.workers), jpeg_fancy_upsampling=fancy),
                                ctx.batch, batches, 2, ctx.device)
        rows.append({"config": ctx.cfg.name, "batch": ctx.batch, "status": "ok", "img_s": got["images_per_s"],
                     "mode": f"DaliTwoViewLoader alone (both views), jpeg_fancy_upsampling={fancy}",
                     "timed_steps": batches})
        pc.save({"rows": rows})
    pipe = {"images_per_s": rows[0]["img_s"]}  # the default (fancy: the torch path's pixels) is the target
    acc = measure(["fastbyol"], ctx, "dali", s.warmup, pc.timed_steps, 1, log=pc.log, deadline=pc.deadline)
    e2e = _rows(acc, ["fastbyol"], ctx, s.warmup)[0]
    e2e["mode"] = "fastbyol (DALI loader)"
    rows.append(e2e)
    ok = e2e["status"] == "ok"
    return {"rows": rows, "targets": [
        target("DALI pipeline images/s (both views)", pipe["images_per_s"], S.DALI_IMG_S, True, "", na),
        target("ResNet-50 e2e images/s (DALI)", e2e["img_s"] if ok else None, S.E2E_IMG_S, True, "", na)]}


def lightly_style_ratios(parts: Dict) -> Dict:
    """Part d, from part c's rows (same device, same run): fastbyol ÷ the lightly-style loop."""
    rows, targets = [], []
    for name in ("e2e-r50", "e2e-cifar"):
        c = parts.get(name, {})
        got = {r["mode"]: r for r in c.get("rows", []) if r["status"] == "ok"}
        for ours, theirs, what in (("fastbyol", "lightly-style", "end to end (each its own loader)"),
                                   ("fastbyol-synthetic", "lightly-style-synthetic", "compute only (pre-made views)"),
                                   # Same precision (the lightly-style loop runs under the same autocast);
                                   # this row takes fastbyol's channels_last out of the compute ratio.
                                   ("fastbyol-synthetic-nchw", "lightly-style-synthetic",
                                    "compute only, both NCHW (without fastbyol's channels_last)"),
                                   ("fastbyol", "lightly", "end to end, the lightly package itself")):
            if ours in got and theirs in got:
                rows.append({"config": got[ours]["config"], "what": what, "fastbyol mode": ours,
                             "fastbyol img/s": got[ours]["img_s"], "baseline": theirs,
                             "baseline img/s": got[theirs]["img_s"], "ratio": got[ours]["img_s"] / got[theirs]["img_s"]})
        if name == "e2e-r50":
            e2e = next((r["ratio"] for r in rows if r["what"].startswith("end to end (")), None)
            targets.append(target("ResNet-50 e2e, fastbyol / lightly-style loop", e2e, S.VS_LIGHTLY_STYLE, True, "x",
                                  "a tiny CPU run" if parts.get("_tiny") else None))
    if not rows:
        raise PartSkip("no pair of rows measured in part c")
    head = rows[0]
    return {"rows": rows, "targets": targets,
            "headline": ("TINY CPU RUN (not a GPU figure): " if parts.get("_tiny") else "")
            + f"fastbyol is {head['ratio']:.2f}x the lightly-style loop ({head['config']}, {head['what']})"}
