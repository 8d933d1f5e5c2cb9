"""``bench_train`` / ``fastbyol bench``: options, the run over configs × batches × modes, files."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import torch

from fastbyol.bench.common import RESULTS, stamp, write_json

from .configs import EXTRA_MODES, MODES, Context, bench_configs
from .data import build_source
from .fastbyol_runner import resolve_full_loader
from .report import check_targets, device_tag, machine_load, markdown_report, peer_headline, plot, versions
from .scaling import gloo_scaling, scaling_estimate
from .timing import measure, summarise

DESCRIPTION = "Whole BYOL training steps per second: fastbyol against lightly and byol-pytorch, one run."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastbyol bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Modes: " + ", ".join(MODES))
    p.add_argument("--smoke", action="store_true",
                   help="CPU seconds for CI: convnet4 at 16 px, batch 16, 1 warm-up + 3 timed steps, workers 0")
    p.add_argument("--configs", default=None, help="comma list of cifar-resnet18, imagenet-resnet50, smoke "
                                                   "(default: the first two; smoke with --smoke)")
    p.add_argument("--batch", default=None, help="per-device batch; a comma list sweeps (default 256; smoke 16)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of modes to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode and round (GPU 30, CPU 5, smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 10, CPU 2, smoke 1)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds over the modes (default 1)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers / DALI threads, the same for every mode (CUDA: cores up to 16; CPU: 2; smoke: 0)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default=None,
                   help="fused loss/EMA backend of the full mode (default: auto on CUDA, torch on CPU, where the "
                        "Triton kernels could only run in the interpreter)")
    p.add_argument("--loader", choices=["auto", "dali", "torch"], default="auto",
                   help="loader of the full mode: auto = the trainer's choice (DALI on CUDA when installed, "
                        "else torch); dali on CPU runs DALI's CPU backend")
    p.add_argument("--data", default=None, help="a real image folder or CIFAR batch dir instead of the generated data")
    p.add_argument("--images", type=int, default=None,
                   help="generated images (default: enough that no timed segment crosses an epoch)")
    p.add_argument("--cache", default=None, help="where the generated JPEG folder is cached (~/.cache/fastbyol/bench)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--interconnect-gbs", type=float, default=None,
                   help="all-reduce bus bandwidth (GB/s) assumed by the multi-device ESTIMATE "
                        "(default 400: NCCL on 8x H100 SXM NVLink; CPU: 10)")
    p.add_argument("--scaling", action="store_true",
                   help="also MEASURE data-parallel step time at 1 and 2 processes on CPU (gloo)")
    p.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[List[str]] = None) -> Dict:
    if argv and argv[0] == "--":  # `fastbyol bench -- ARGS` passes the separator through
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu and not args.smoke else torch.device("cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    configs = (args.configs or ("smoke" if args.smoke else "cifar-resnet18,imagenet-resnet50")).split(",")
    batches = [int(b) for b in (args.batch or ("16" if args.smoke else "256")).split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES + EXTRA_MODES:
            raise SystemExit(f"bench_train: unknown mode {m!r}; choose from {', '.join(MODES)}")
    all_cfgs = bench_configs()
    for c in configs:
        if c not in all_cfgs:
            raise SystemExit(f"bench_train: unknown config {c!r}; choose from {', '.join(all_cfgs)}")
    steps = args.steps or (3 if args.smoke else 30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10 if cuda else 2)
    precision = args.precision or ("bf16" if cuda else "fp32")
    workers = args.workers if args.workers is not None else (0 if args.smoke else min(16, os.cpu_count() or 1) if cuda else 2)
    kernels = args.kernels or ("auto" if cuda else "torch")
    gbs = args.interconnect_gbs or (400.0 if cuda else 10.0)
    full_loader, no_dali = resolve_full_loader(args.loader, device)
    command = "fastbyol bench " + " ".join(argv if argv is not None else sys.argv[1:])
    st = stamp(device)
    load_before = machine_load()
    print(f"bench_train on {st['device']} (torch {st['torch']}, {st['date']}): configs {configs}, batch {batches}, "
          f"{precision}, {warmup}+{steps} steps x {args.rounds} round(s), workers {workers}, full loader {full_loader}",
          flush=True)

    rows: List[Dict] = []
    estimates: Dict = {}
    for cname in configs:
        cfg = all_cfgs[cname]
        # The trainer holds out a tenth of a folder for kNN: enough that no timed segment crosses an epoch.
        n_images = args.images or int((max(batches) * (warmup + steps) + max(batches)) / 0.9) + 1
        source = build_source(cfg, n_images, args.data, args.cache)
        for batch in batches:
            print(f"[{cname}, batch {batch}] {len(source)} images from {source.root}", flush=True)
            ctx = Context(cfg, device, batch, precision, workers, kernels, source, args.seed, no_dali_reason=no_dali)
            acc = measure(modes, ctx, full_loader, warmup, steps, args.rounds)
            group = []
            for m in modes:
                a = acc[m]
                row = {"config": cname, "batch": batch, "mode": m, "image_size": cfg.image_size,
                       "backbone": cfg.backbone + (" (CIFAR stem)" if cfg.cifar_stem else "")}
                if "skipped" in a:
                    row.update(status=a["skipped"])
                else:
                    row.update(status="ok", **summarise(a["times"], a["walls"], batch), peak_mem_gib=a["peak"],
                               details=a["details"], grad_bytes=a["grad_bytes"])
                group.append(row)
            by = {r["mode"]: r for r in group if r["status"] == "ok"}
            ceiling = by.get("fastbyol-synthetic")
            for r in group:
                if r["status"] != "ok" or not r["mode"].startswith(("fastbyol", "ablate")):
                    continue
                if ceiling and r["mode"] != "fastbyol-synthetic":
                    r["vs_ceiling"] = r["img_s"] / ceiling["img_s"]
                    if r["mode"] in ("fastbyol", "ablate-torch-loader"):
                        r["data_share"] = 1 - r["vs_ceiling"]
                for peer, key in (("lightly", "x_lightly"), ("byol-pytorch", "x_byol_pytorch")):
                    if peer in by:
                        r[key] = r["img_s"] / by[peer]["img_s"]
            rows += group
            ref = ceiling or by.get("fastbyol")
            if ref and (cname not in estimates or batch == 256):
                estimates[cname] = {"batch": batch, "step_ms": ref["step_ms"], "grad_mb": ref["grad_bytes"] / 1e6,
                                    "from_mode": ref["mode"],
                                    "rows": scaling_estimate(ref["step_ms"] / 1e3, ref["grad_bytes"], gbs)}

    result = {
        "benchmark": "bench_train", "stamp": st, "versions": versions(), "command": command, "device_type": device.type,
        "precision": precision, "workers": workers, "warmup": warmup, "steps": steps, "rounds": args.rounds,
        "kernels": kernels, "full_loader": full_loader, "rows": rows,
        "interconnect_gbs": gbs, "scaling_estimate": estimates,
        "machine_load": {"before": load_before, "after": machine_load()},
        "notes": [
            "img/s = batch / median step time; a step is timed from asking for the batch to the finished target "
            "update, synchronised; 'img_s_mean' is the segment mean (pipelined loaders).",
            "data share = 1 - e2e / ceiling, ceiling = fastbyol-synthetic (same step on views already on the device).",
            "Peers run their own loops unchanged except: the same encoder, head widths and autocast as fastbyol.",
            "fastbyol rows time Trainer.train_micro_batch of a real fastbyol.trainer.Trainer (schedules, NaN guard, "
            "target EMA included).",
            f"The fused loss/EMA run backend {kernels!r}: on CPU that is their torch reference (Triton needs CUDA), so "
            "ablate-eager-loss runs the same code as fastbyol and its difference is run-to-run noise."
            if not cuda else "",
            "Scaling rows are an ESTIMATE from the measured step time and fp32 gradient bytes at the stated bandwidth, "
            "ring all-reduce; SyncBatchNorm traffic ignored." if estimates else "",
            "Generated JPEGs are read from the page cache (a real ImageNet may not fit in RAM)."
            if any(all_cfgs[c].source == "jpeg" for c in configs) and not args.data else "",
        ],
    }
    result["notes"] = [n for n in result["notes"] if n]
    if args.scaling:
        print("gloo data-parallel scaling (CPU, measured):", flush=True)
        n = args.images or 2 * batches[0] * (warmup + steps + 1)
        root = build_source(all_cfgs[configs[0]], n, args.data, args.cache).root
        result["gloo_scaling"] = gloo_scaling(configs[0], batches[0], warmup, steps, root)
    result["targets"] = check_targets(rows, device)

    tag = f"bench_train_{device_tag(device)}_{'+'.join(configs)}"  # e.g. bench_train_cpu_smoke
    os.makedirs(args.out, exist_ok=True)
    result["json"] = write_json(result, tag + ".json", args.out)
    md = markdown_report(result)
    with open(os.path.join(args.out, tag + ".md"), "w") as fh:
        fh.write(md)
    result["png"] = plot(result, os.path.join(args.out, tag + ".png"))
    write_json(result, tag + ".json", args.out)
    print()
    print(md)
    for line in peer_headline(rows):
        print(line.lstrip("- ").replace("**", ""), flush=True)
    print(f"wrote {result['json']}, {tag}.md" + (f", {tag}.png" if result["png"] else ""))
    return result
