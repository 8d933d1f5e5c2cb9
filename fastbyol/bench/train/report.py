"""The training benchmark's report: versions, the table, the bar chart, the targets."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from fastbyol.bench.common import markdown_table
from fastbyol.monitor import headless_pyplot

from .configs import MODES, PEERS
from .peers import PEER_INSTALL


def versions() -> Dict:
    out = {}
    for name, mod in (("torchvision", "torchvision"), ("numpy", "numpy"), ("pillow", "PIL"), ("lightly", "lightly"),
                      ("nvidia-dali", "nvidia.dali")):
        try:
            out[name] = getattr(__import__(mod, fromlist=["__version__"]), "__version__", "?")
        except Exception:
            out[name] = None
    try:
        from importlib.metadata import version

        out["byol-pytorch"] = version("byol-pytorch")
    except Exception:
        out["byol-pytorch"] = None
    out["cuda"] = torch.version.cuda
    return out


def machine_load() -> Dict:
    """Load average and CPU pressure (Linux PSI): a shared, noisy box shows here."""
    out = {}
    for key, path in (("loadavg", "/proc/loadavg"), ("cpu_pressure", "/proc/pressure/cpu")):
        try:
            with open(path) as fh:
                out[key] = fh.readline().strip()
        except OSError:
            pass
    return out


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


COLUMNS = ["config", "batch", "mode", "img/s", "step ms (p25-p75)", "peak GiB", "data share", "vs ceiling",
           "x lightly", "x byol-pytorch", "status"]


def table_rows(rows: List[Dict]) -> List[Dict]:
    out = []
    for r in rows:
        ok = r["status"] == "ok"
        f = lambda k, fmt="{:.2f}": (fmt.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        out.append({
            "config": r["config"], "batch": r["batch"], "mode": r["mode"],
            "img/s": f("img_s", "{:,.1f}"),
            "step ms (p25-p75)": f"{r['step_ms']:.1f} ({r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f})" if ok else "",
            "peak GiB": f("peak_mem_gib"), "data share": f("data_share", "{:.1%}"), "vs ceiling": f("vs_ceiling", "{:.1%}"),
            "x lightly": f("x_lightly", "{:.2f}x"), "x byol-pytorch": f("x_byol_pytorch", "{:.2f}x"),
            "status": r["status"],
        })
    return out


def plot(result: Dict, path: str) -> Optional[str]:
    plt = headless_pyplot()
    if plt is None:
        return None
    groups: Dict = {}
    for r in result["rows"]:
        groups.setdefault((r["config"], r["batch"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.45 * len(MODES) * len(groups) + 1.2), squeeze=False)
    for ax, ((cfg, batch), rows) in zip(axes[:, 0], groups.items()):
        names = [r["mode"] for r in rows][::-1]
        vals = [r.get("img_s") or 0.0 for r in rows][::-1]
        colours = ["tab:blue" if n.startswith("fastbyol") else "tab:gray" if n in PEERS else "tab:orange" for n in names]
        bars = ax.barh(names, vals, color=colours)
        for b, r in zip(bars, rows[::-1]):
            text = f" {r['img_s']:,.1f}" if r["status"] == "ok" else f" {r['status'][:60]}"
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, text, va="center", fontsize=7)
        ax.set_title(f"{cfg}, batch {batch}", fontsize=9)
        ax.set_xlabel("images/s (median step)")
        ax.set_xlim(0, max(vals + [1e-9]) * 1.35)
    s = result["stamp"]
    fig.suptitle(f"BYOL training step throughput — {s['device']}\ntorch {s['torch']}, {s['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(result: Dict) -> str:
    s = result["stamp"]
    lines = [f"# bench_train: BYOL training-step throughput ({s['device']})", "",
             f"- date {s['date']}, torch {s['torch']}, python {s['python']}, "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
             f"- command: `{result['command']}`",
             *peer_headline(result["rows"]),
             f"- precision {result['precision']}, workers {result['workers']}, warm-up {result['warmup']} + "
             f"{result['steps']} timed steps x {result['rounds']} round(s) per mode; img/s = batch / median step",
             "", markdown_table(table_rows(result["rows"]), COLUMNS), ""]
    for r in result["rows"]:
        if r["status"] == "ok":
            lines.append(f"- **{r['config']} / {r['mode']}**: " + "; ".join(f"{k}: {v}" for k, v in r["details"].items()))
    if result.get("scaling_estimate"):
        lines += ["", f"## Multi-device scaling — ESTIMATE (not measured), {result['interconnect_gbs']} GB/s all-reduce "
                      "bus bandwidth assumed", ""]
        for cfg, est in result["scaling_estimate"].items():
            lines.append(f"- {cfg}: {est['grad_mb']:.1f} MB of fp32 gradients per step, measured 1-device step "
                         f"{est['step_ms']:.1f} ms → " + ", ".join(
                             f"{e['devices']}×: +{e['allreduce_ms']:.1f} ms, eff. {e['efficiency_no_overlap']:.0%}"
                             f"–{e['efficiency_full_overlap']:.0%}" for e in est["rows"]))
    g = result.get("gloo_scaling")
    if g:
        lines += ["", f"## Data-parallel scaling on CPU — MEASURED (gloo, {g['config']}, batch {g['per_process_batch']}"
                      f"/process, {g['threads_per_process']} thread(s)/process, {g['inputs']})", "",
                  markdown_table([{"processes": r["processes"], "step ms": r["step_s"] * 1e3,
                                   "all-reduce ms": r["allreduce_s"] * 1e3, "img/s": r["img_s"],
                                   "speedup": r["speedup"], "efficiency": r["efficiency"]} for r in g["rows"]],
                                 ["processes", "step ms", "all-reduce ms", "img/s", "speedup", "efficiency"])]
    if result.get("targets"):
        lines += ["", "## Targets (H100, imagenet-resnet50, bf16)", ""]
        lines += [f"- {k}: {v}" for k, v in result["targets"].items()]
    lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def peer_headline(rows: List[Dict]) -> List[str]:
    """A loud line when a peer was not measured: its ratio columns are then empty, not 'parity'."""
    missing = {}
    for r in rows:
        if r["mode"] in PEERS and r["status"] != "ok":
            missing.setdefault(r["mode"], r["status"])
    if not missing:
        return []
    return [f"- **PEERS NOT MEASURED: {', '.join(missing)}** ({'; '.join(f'{k}: {v}' for k, v in missing.items())}); "
            f"their ratio columns are empty. Install them with `{PEER_INSTALL}`."]


def check_targets(rows: List[Dict], device: torch.device) -> Dict:
    if device.type != "cuda":
        return {"status": "n/a: the targets are for an H100; this run is on CPU"}
    full = [r for r in rows if r["config"] == "imagenet-resnet50" and r["mode"] == "fastbyol" and r["status"] == "ok"]
    if not full:
        return {"status": "n/a: imagenet-resnet50 fastbyol not measured"}
    r = max(full, key=lambda r: r["batch"] == 256)
    t = {"batch": r["batch"], "img_s >= 1900": f"{r['img_s']:.0f} → {'PASS' if r['img_s'] >= 1900 else 'FAIL'}"}
    if r.get("vs_ceiling") is not None:
        t[">= 95% of ceiling"] = f"{r['vs_ceiling']:.1%} → {'PASS' if r['vs_ceiling'] >= 0.95 else 'FAIL'}"
    for k, name in (("x_lightly", "lightly"), ("x_byol_pytorch", "byol-pytorch")):
        if r.get(k) is not None:
            t[f">= 3x {name}"] = f"{r[k]:.2f}x → {'PASS' if r[k] >= 3 else 'FAIL'}"
    return t
