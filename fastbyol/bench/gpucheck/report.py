"""gpu-check's record: what ran where (device, driver, versions, date, commit) and the
Markdown table of every part, its rows and each target marked met / missed."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Dict, List

import torch

from fastbyol.bench.common import markdown_table
from fastbyol.monitor import headless_pyplot


def _version(module: str):
    try:
        mod = __import__(module, fromlist=["__version__"])
        return getattr(mod, "__version__", "?")
    except Exception:
        return None


def _installed(*dists: str):
    """An installed distribution's version, without importing it (DeepSpeed's import is slow and loud)."""
    from importlib.metadata import PackageNotFoundError, version

    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            pass
    return None


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:
        pass
    try:  # the CUDA driver API version (e.g. 13000), when nvidia-smi is not there
        v = torch._C._cuda_getDriverVersion()
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10} (nvidia-smi not found)"
    except Exception:
        return "unknown"


def _commit(root: str):
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def stamp(device: torch.device, root: str) -> Dict:
    import fastbyol
    import fastbyol_kernels

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "triton": _version("triton"),
            "torchvision": _version("torchvision"), "numpy": _version("numpy"), "pillow": _version("PIL"),
            "nvidia-dali": _installed("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali"),
            "deepspeed": _installed("deepspeed"), "lightly": _installed("lightly"), "fastbyol": fastbyol.__version__, "commit": _commit(root),
            "fastbyol_from": os.path.dirname(fastbyol.__file__),
            "fastbyol_kernels_from": os.path.dirname(fastbyol_kernels.__file__), "cpu_count": os.cpu_count(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), driver=_driver(),
                    device_memory_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}")
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    driver=None)
    return info


def _fmt_row(r: Dict) -> Dict:
    out = {}
    for k, v in r.items():
        if isinstance(v, dict):
            v = "; ".join(f"{a}: {b}" for a, b in v.items())
        out[k] = v
    return out


def markdown(result: Dict) -> str:
    s = result["stamp"]
    versions = ", ".join(f"{k} {s[k]}" for k in ("python", "torch", "cuda", "cudnn", "triton", "torchvision",
                                                 "nvidia-dali", "deepspeed", "lightly") if s.get(k))
    lines = [f"# fastbyol gpu-check: {s['device']}{' (TINY CPU RUN: no GPU figures)' if result['tiny'] else ''}", "",
             f"- date {s['date']}, driver {s['driver']}, commit {s.get('commit')}, host {s['host']}",
             f"- {versions}", f"- command: `{s['command']}`; {result['seconds']:.0f} s in all", ""]
    if result.get("headline"):
        lines += [f"**{result['headline']}**", ""]
    lines += ["## Targets", "", markdown_table(result["targets"], ["part", "target", "measured", "verdict"]), "",
              "## Parts", "", markdown_table([{"part": f"{p['letter']}. {name}", "status": p["status"],
                                               "seconds": round(p.get("seconds") or 0, 1), "cap s": p.get("cap_s"),
                                               "what": p["title"]} for name, p in result["parts"].items()],
                                             ["part", "status", "seconds", "cap s", "what"]), ""]
    for name, p in result["parts"].items():
        rows: List[Dict] = p.get("md_rows", p.get("rows")) or []
        if p.get("summary"):
            lines += [f"### {p['letter']}. {name}: {p['summary']}", ""]
        if not rows:
            continue
        cols = [c for c in rows[0] if c not in ("details", "where")]
        for r in rows:
            cols += [c for c in r if c not in cols and c not in ("details", "where")]
        if not p.get("summary"):
            lines += [f"### {p['letter']}. {name}: {p['title']}", ""]
        lines += [markdown_table([_fmt_row(r) for r in rows], cols), ""]
        for r in rows:
            if r.get("details"):
                lines.append(f"- {r.get('mode', '')}: " + _fmt_row({"d": r["details"]})["d"])
            if r.get("where"):
                lines.append(f"- {r['what']}: syncs at " + ", ".join(f"{k} ({v})" for k, v in r["where"].items()))
        lines += [f"- note: {n}" for n in p.get("notes", [])] + [""]
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: str):
    """Images/s of every end-to-end row (parts c and f), one bar each, grouped by config; None
    without matplotlib."""
    plt = headless_pyplot()
    if plt is None:
        return None
    bars = [(f"{r['config']} · {r['mode']}", r["img_s"], r["mode"]) for name, p in result["parts"].items()
            if name.startswith(("e2e", "dali")) for r in p.get("rows", []) if r.get("status") == "ok" and r.get("img_s")]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.4))
    labels, vals, modes = zip(*bars[::-1])
    colours = ["tab:blue" if m.startswith("fastbyol") else "tab:orange" if "lightly" in m else "tab:gray" for m in modes]
    ax.barh(labels, vals, color=colours)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
    ax.set_xlabel("images/s (median step)")
    ax.set_xlim(0, max(vals) * 1.2)
    ax.tick_params(axis="y", labelsize=7)
    s = result["stamp"]
    ax.set_title(f"fastbyol gpu-check — {s['device']}{' (TINY CPU RUN)' if result['tiny'] else ''}\n"
                 f"torch {s['torch']}, {s['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
