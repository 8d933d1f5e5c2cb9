"""``fastbyol gpu-check``: every part in turn, each in its own process with its own time cap
(a hang, a crash or a poisoned CUDA context in one part never stops the rest), then one JSON
and one Markdown table. ``--in-process`` runs the parts in this process instead (the tests;
caps are then soft: a part starts no new segment past its cap)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

import torch

from fastbyol._checkout import checkout_root
from fastbyol.bench.common import results_dir
from fastbyol.errors import FastByolError

from . import finite_check, micro, model, train
from .report import markdown, plot, stamp
from .settings import PART_NAMES, PARTS, PartSkip, settings

DERIVED = {"name": "lightly-style", "letter": "d",
           "title": "fastbyol / the same step written as lightly's BYOL example (torch only), from part c"}
CALIBRATION = {"letter": "h'", "title": "modelled (fastbyol cost) against measured ms per stage, from parts b, c and h"}
RESULTS = results_dir()


@dataclasses.dataclass
class PartContext:
    settings: object
    device: torch.device
    out: str  # scratch folder of this run (the benchmarks' own JSON); the record goes elsewhere
    cache: Optional[str]
    deadline: float  # perf_counter time past which a part starts nothing new
    save_path: Optional[str] = None
    loader: Dict = dataclasses.field(default_factory=dict)  # loader_budget() of the part's last context
    timed_steps: int = 0  # sustained_steps() of the part's last context

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def save(self, partial: Dict) -> None:
        """What a part has so far, for the parent to keep if this process is killed at its cap."""
        if self.save_path:
            _write(self.save_path, dict(partial, status="partial"))


FUNCS = {"kernels": micro.part_kernels, "micro": micro.part_micro, "e2e-r50": lambda pc: train.part_e2e(pc, "e2e-r50"),
         "e2e-cifar": lambda pc: train.part_e2e(pc, "e2e-cifar"), "syncs": train.part_syncs,
         "e2e-r50-compile": train.part_compile, "dali": train.part_dali, "finite": finite_check.part_finite,
         "model": model.part_model}


def _write(path: str, obj: Dict) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(path + ".tmp", path)


def run_part(name: str, pc: PartContext) -> Dict:
    """One part, its failure caught: ``{"status": "ok" | "skipped: why" | "error: what", ...}``."""
    t0 = time.perf_counter()
    try:
        res = dict(FUNCS[name](pc), status="ok")
    except PartSkip as e:
        res = {"status": f"skipped: {e}"}
    except Exception as e:  # the report says what broke; the next part runs
        traceback.print_exc()
        res = {"status": f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
               "traceback": traceback.format_exc()[-4000:]}
    res["seconds"] = time.perf_counter() - t0
    return res


def _spawn_part(name: str, args, cap: float, scratch: str) -> Dict:
    """The part in a child ``python -m fastbyol gpu-check --part NAME``, killed (its whole process
    group: DataLoader workers too) at ``cap`` seconds; what it saved so far is kept."""
    path = os.path.join(scratch, f"part-{name}.json")
    cmd = [sys.executable, "-m", "fastbyol", "gpu-check", "--part", name, "--part-out", path, "--cap", f"{cap:.0f}",
           "--out", scratch] + (["--tiny"] if args.tiny else []) + (["--cache", args.cache] if args.cache else [])
    env = dict(os.environ)
    root = checkout_root()  # the child imports this very checkout, installed or not
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=cap)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, timed_out = proc.wait(), True
    except BaseException:  # this run is being stopped: its own session must not outlive it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    res: Dict = {}
    if os.path.exists(path):
        with open(path) as fh:
            res = json.load(fh)
    if timed_out:
        res["status"] = f"timed out at its {cap:.0f} s cap" + (" (rows so far kept)" if res.get("rows") else "")
    elif res.get("status", "partial") == "partial":
        res["status"] = f"error: the part's process exited with code {rc} before finishing"
    res["seconds"] = time.perf_counter() - t0
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastbyol gpu-check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Parts: " + ", ".join(f"{q.letter}. {q.name}" for q in PARTS))
    p.add_argument("--tiny", action="store_true", help="CPU, seconds: the same parts on a 4-layer convnet at 16 px (CI)")
    p.add_argument("--parts", default=",".join(PART_NAMES), help="comma list of part names or letters (default: all)")
    p.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--cache", default=None, help="where generated images are kept (~/.cache/fastbyol/bench)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (GPU 540, tiny 600); parts it does not reach are reported as skipped")
    p.add_argument("--in-process", action="store_true", help="run the parts in this process (soft caps)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # a child: run one part
    p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    return p


def _select(spec: str) -> List[str]:
    out = []
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        names = [q.name for q in PARTS if item in (q.name, q.letter)]
        if not names:
            raise FastByolError(f"gpu-check: unknown part {item!r}; choose from "
                                + ", ".join(f"{q.letter}/{q.name}" for q in PARTS))
        out += [n for n in names if n not in out]
    return out


def _device(tiny: bool) -> torch.device:
    return torch.device("cpu") if tiny else torch.device("cuda", 0)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is built: the kernels run interpreted
    s = settings(args.tiny)
    if args.part:  # a child process: one part, its result to --part-out
        pc = PartContext(s, _device(args.tiny), args.out, args.cache,
                         time.perf_counter() + 0.85 * (args.cap or 600), save_path=args.part_out)
        torch.backends.cudnn.benchmark = True
        _write(args.part_out, run_part(args.part, pc))
        return 0
    if not args.tiny and not torch.cuda.is_available():
        raise FastByolError(f"gpu-check needs a CUDA GPU and torch {torch.__version__} sees none "
                            "(`fastbyol gpu-check --tiny` runs the CPU smoke version)")
    names = _select(args.parts)
    signal.signal(signal.SIGTERM, _stop)  # e.g. `timeout`: the part's process group goes with this one
    device = _device(args.tiny)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    budget = args.budget or s.budget_s
    info = stamp(device, checkout_root())
    tag = "tiny_cpu" if args.tiny else "".join(c if c.isalnum() else "-" for c in info["device"].lower()).strip("-")
    run_dir = os.path.join(args.out, f"gpu_check_{tag}")  # gpu_check.json and .md, nothing else
    os.makedirs(run_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="fastbyol-gpu-check-")
    print(f"fastbyol gpu-check on {info['device']} (torch {info['torch']}, triton {info['triton']}, "
          f"{info['date']}): parts {', '.join(names)}, budget {budget:.0f} s", flush=True)
    t_start = time.perf_counter()
    parts: Dict[str, Dict] = {}
    result = {"gpu_check": 1, "tiny": args.tiny, "stamp": info, "settings": dataclasses.asdict(s), "parts": parts}
    for q in PARTS:
        if q.name not in names:
            continue
        left = budget - (time.perf_counter() - t_start)
        cap = min(q.tiny_cap_s if args.tiny else q.cap_s, left)
        print(f"\n[gpu-check] {q.letter}. {q.name}: {q.title} (cap {cap:.0f} s, {left:.0f} s of the run left)", flush=True)
        if cap < 15:
            res = {"status": f"skipped: the run's {budget:.0f} s budget was spent before this part"}
        elif args.in_process:
            res = run_part(q.name, PartContext(s, device, scratch, args.cache, time.perf_counter() + cap))
        else:
            res = _spawn_part(q.name, args, cap, scratch)
        parts[q.name] = dict(res, letter=q.letter, title=q.title, cap_s=round(cap))
        print(f"[gpu-check] {q.letter}. {q.name}: {res['status']} ({res.get('seconds', 0):.0f} s)", flush=True)
        _finish(result, t_start, run_dir)  # after every part: a killed run still leaves its record
    if any(n.startswith("e2e-") for n in names):
        try:
            res = dict(train.lightly_style_ratios(dict(parts, _tiny=args.tiny)), status="ok")
        except PartSkip as e:
            res = {"status": f"skipped: {e}"}
        parts["lightly-style"] = dict(res, **DERIVED)
        result["headline"] = res.get("headline")
    if "model" in names:
        try:
            res = dict(model.calibration(parts), status="ok")
        except PartSkip as e:
            res = {"status": f"skipped: {e}"}
        parts["calibration"] = dict(res, **CALIBRATION)
    code = _finish(result, t_start, run_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    png = plot(result, os.path.join(run_dir, "gpu_check.png"))
    print("\n" + markdown(result))
    print(f"wrote {os.path.join(run_dir, 'gpu_check.json')}, gpu_check.md" + (", gpu_check.png" if png else ""), flush=True)
    return code


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def _finish(result: Dict, t_start: float, run_dir: str) -> int:
    """Targets gathered, exit code (1: a part failed or a kernel is off), JSON + Markdown written."""
    parts = result["parts"]
    result["targets"] = [dict(t, part=f"{p['letter']}. {name}") for name, p in parts.items()
                         for t in p.get("targets", [])]
    bad = [n for n, p in parts.items() if not (p["status"] == "ok" or p["status"].startswith("skipped"))]
    bad += [n for n, p in parts.items() if p.get("failed")]
    result["failed_parts"] = bad
    result["exit_code"] = 1 if bad else 0
    result["seconds"] = time.perf_counter() - t_start
    _write(os.path.join(run_dir, "gpu_check.json"), result)
    with open(os.path.join(run_dir, "gpu_check.md"), "w") as fh:
        fh.write(markdown(result))
    return result["exit_code"]
