"""fastbyol's full training step against lightly's BYOL example, side by side, on CPU.

Issue #2's performance acceptance: ResNet-18 at 32 px, the same batch, fp32, one CPU run;
fastbyol must not be slower. Both sides train the *same network*: the example's backbone
(``torchvision.models.resnet18()`` without ``fc``: ImageNet stem, as the example runs it on
CIFAR-10; ``--cifar-stem`` swaps in the 3×3 CIFAR stem on both sides) and the example's head
sizes (projection 512 → 1024 → 256, prediction 256 → 1024 → 256; fastbyol is configured to
match). Both read the same generated CIFAR-like uint8 array in memory:

  lightly             the example's loop with the lightly package: ``BYOLTransform`` (PIL, per
                      image; blur off as the example sets it for CIFAR) in a DataLoader,
                      ``update_momentum``, ``NegativeCosineSimilarity``, SGD(lr=0.06)
  fastbyol            ``TorchTwoViewLoader`` (workers crop and run the batched photometry, as
                      on any CPU device) → BYOL forward → multi-tensor LARS → ``ModuleEMA``
  *-synthetic         the same two loops on pre-made tensors (compute only, no data pipeline)
  fastbyol-synthetic-sgd   attribution only: fastbyol's compute step with the example's
                      optimizer (SGD lr 0.06, no momentum) instead of LARS

Modes alternate over ``--rounds`` rounds (fresh model and loader per segment), so drifts on a
noisy machine spread over both; img/s = batch / median step. A breakdown measures where each
side's time goes: host work per batch (one process), device-side augmentation, compute.

    python -m fastbyol.bench.vs_lightly [--batch 64] [--workers 2] [--rounds 8] [--cifar-stem]

Writes ``vs_lightly_cpu[_cifarstem]_w<workers>_b<batch>.{json,md}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from fastbyol.bench import train as bt
from fastbyol.bench.train.configs import _augment
from fastbyol.bench.common import RESULTS, markdown_table, stamp, write_json

MODES = ["fastbyol", "lightly", "fastbyol-synthetic", "lightly-synthetic", "fastbyol-synthetic-sgd"]


def example_config(cifar_stem: bool) -> bt.BenchConfig:
    return bt.BenchConfig("resnet18-32px-lightly-example" + ("-cifarstem" if cifar_stem else ""), "resnet18",
                          cifar_stem, 32, 1024, 256, 1024, "array", _augment("cifar10-resnet18", 32), peer_blur=0.0)


def interleaved_medians(pieces: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median milliseconds of each callable, timed round-robin (one call of each per pass), so a
    burst of load from elsewhere on the machine hits every piece alike instead of one."""
    for fn in pieces.values():  # warm-up
        fn()
    times: Dict[str, List[float]] = {k: [] for k in pieces}
    for _ in range(repeats):
        for k, fn in pieces.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def breakdown(ctx: bt.Context, repeats: int = 9) -> Dict[str, Dict[str, float]]:
    """Milliseconds per batch of each side's pieces, each alone in this process (interleaved)."""
    from torch.utils.data import default_collate

    from fastbyol.augment import augment_pair
    from fastbyol.data.torch_loader import TwoCropDataset

    b, src, cfg = ctx.batch, ctx.source, ctx.cfg
    idx = list(range(b))
    pieces: Dict[str, Callable[[], object]] = {}
    ds = TwoCropDataset(src, cfg.augment, ctx.seed)
    pieces["fastbyol|host: decode + 2 random-resized crops + collate (per batch, 1 process)"] = \
        lambda: ds[idx]
    crops, _, _, draws = ds[idx]
    pieces["fastbyol|batched photometric augmentation (augment_pair; in the workers on CPU)"] = \
        lambda: augment_pair(crops, cfg.augment, draws, torch.float32, True)
    fb = bt.FastByolRunner(ctx, loader="synthetic")  # compute pieces, on pre-made views
    v1, v2 = fb.views
    pieces["fastbyol|forward + backward (4 forwards, fused-loss reference)"] = \
        lambda: fb.model(v1, v2, online=fb.engine.module).loss.backward()
    pieces["fastbyol|LARS step (multi-tensor)"] = fb.engine.optimizer.step
    pieces["fastbyol|target EMA (ModuleEMA)"] = fb.update_target
    try:
        from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform

        li = bt.LightlyRunner(ctx, synthetic=True)
        m, (w1, w2) = li.model, li.views

        def li_fwd_bwd():
            p0, z0, p1, z1 = m(w1), m.forward_momentum(w1), m(w2), m.forward_momentum(w2)
            (0.5 * (li.criterion(p0, z1) + li.criterion(p1, z0))).backward()

        pieces["lightly|forward + backward (4 forwards, NegativeCosineSimilarity)"] = li_fwd_bwd
        pieces["lightly|SGD step (no momentum)"] = li.optimizer.step
        pieces["lightly|target EMA (2x update_momentum)"] = lambda: (
            li.update_momentum(m.backbone, m.backbone_momentum, m=li.momentum_val),
            li.update_momentum(m.projection_head, m.projection_head_momentum, m=li.momentum_val))
        t = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=cfg.image_size, gaussian_blur=0.0),
                          view_2_transform=BYOLView2Transform(input_size=cfg.image_size, gaussian_blur=0.0))
        pds = bt.PILDataset(src, t)
        pieces["lightly|host: decode + BYOLTransform both views + collate (per batch, 1 process)"] = \
            lambda: default_collate([pds[i] for i in idx])
    except (ImportError, bt.Skip):
        pass
    out: Dict[str, Dict[str, float]] = {"fastbyol": {}, "lightly": {}}
    for k, v in interleaved_medians(pieces, repeats).items():
        side, name = k.split("|", 1)
        out[side][name] = v
    return out


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per segment")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per segment")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds over the modes")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem, no max-pool, on both sides")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)

    device = torch.device("cpu")
    cfg = example_config(args.cifar_stem)
    n = args.batch * (args.warmup + args.steps + 1)
    source = bt.build_source(cfg, n, None, None)
    ctx = bt.Context(cfg, device, args.batch, "fp32", args.workers, "torch", source)
    st = stamp(device)
    print(f"bench_vs_lightly on {st['device']} ({st['date']}): {cfg.name}, batch {args.batch}, fp32, "
          f"workers {args.workers}, {args.warmup}+{args.steps} steps x {args.rounds} rounds", flush=True)
    load_before = bt.machine_load()
    acc = bt.measure(MODES, ctx, "torch", args.warmup, args.steps, args.rounds)
    rows = []
    for m in MODES:
        a = acc[m]
        if "skipped" in a:
            rows.append({"mode": m, "status": a["skipped"]})
        else:
            rows.append({"mode": m, "status": "ok", **bt.summarise(a["times"], a["walls"], args.batch),
                         "details": a["details"]})
    by = {r["mode"]: r for r in rows if r["status"] == "ok"}
    ratios = {}
    for name, f, l in (("end-to-end", "fastbyol", "lightly"), ("compute-only", "fastbyol-synthetic", "lightly-synthetic"),
                       ("compute-only, same optimizer (SGD) [attribution]", "fastbyol-synthetic-sgd", "lightly-synthetic")):
        if f in by and l in by:
            paired = [lt / ft for ft, lt in zip(acc[f]["round_medians"], acc[l]["round_medians"])]
            ratios[name] = {"fastbyol_img_s": by[f]["img_s"], "lightly_img_s": by[l]["img_s"],
                            "ratio_median": by[f]["img_s"] / by[l]["img_s"],
                            "ratio_mean": by[f]["img_s_mean"] / by[l]["img_s_mean"],
                            "ratio_per_round": paired, "ratio_paired_median": statistics.median(paired),
                            "rounds_fastbyol_faster": sum(r > 1 for r in paired)}
    parts = None if args.no_breakdown else breakdown(ctx)
    result = {"benchmark": "bench_vs_lightly", "stamp": st, "versions": bt.versions(),
              "command": "python -m fastbyol.bench.vs_lightly " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {"backbone": "torchvision resnet18 without fc" + (" (CIFAR stem)" if args.cifar_stem else
                                                                           " (ImageNet stem, as the example)"),
                         "image_size": 32, "projection": "512 -> 1024 -> 256", "prediction": "256 -> 1024 -> 256",
                         "batch": args.batch, "precision": "fp32", "workers": args.workers,
                         "data": f"{len(source)} generated CIFAR-like uint8 images in memory",
                         "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                         "threads": torch.get_num_threads()},
              "rows": rows, "ratios": ratios, "breakdown_ms_per_batch": parts,
              "machine_load": {"before": load_before, "after": bt.machine_load()},
              "verdict": verdict(ratios)}
    tag = f"vs_lightly_cpu{'_cifarstem' if args.cifar_stem else ''}_w{args.workers}_b{args.batch}"
    result["json"] = write_json(result, tag + ".json", args.out)
    md = report(result)
    with open(os.path.join(args.out, tag + ".md"), "w") as fh:
        fh.write(md)
    print()
    print(md)
    return result


def verdict(ratios: Dict) -> str:
    main = {k: v for k, v in ratios.items() if "attribution" not in k}
    if not main:
        return "not measured (lightly missing?)"
    slower = [k for k, v in main.items() if v["ratio_paired_median"] < 1.0]  # paired per round: robust to drift
    if not slower:
        return "fastbyol is not slower (end-to-end and compute-only)"
    return "fastbyol is SLOWER in: " + ", ".join(slower) + " (see where the time goes)"


def report(r: Dict) -> str:
    s, c = r["stamp"], r["config"]
    lines = [f"# fastbyol vs lightly's BYOL example ({s['device']})", "",
             f"- date {s['date']}, torch {s['torch']}, lightly {r['versions'].get('lightly')}, python {s['python']}",
             f"- command: `{r['command']}`",
             f"- same network on both sides: {c['backbone']}, {c['image_size']} px, projection {c['projection']}, "
             f"prediction {c['prediction']}; batch {c['batch']}, {c['precision']}, {c['threads']} threads, "
             f"{c['workers']} DataLoader workers each; {c['data']}",
             f"- {c['warmup']} warm-up + {c['steps']} timed steps per segment, {c['rounds']} alternating rounds; "
             "img/s = batch / median step",
             f"- machine load (shared 2-core box) before: {r['machine_load']['before']}, after: {r['machine_load']['after']}",
             "",
             markdown_table([{"mode": x["mode"], "img/s": x.get("img_s"), "img/s (mean)": x.get("img_s_mean"),
                              "step ms": x.get("step_ms"), "p25": x.get("step_ms_p25"), "p75": x.get("step_ms_p75"),
                              "status": x["status"]} for x in r["rows"]],
                            ["mode", "img/s", "img/s (mean)", "step ms", "p25", "p75", "status"]), ""]
    for name, x in r["ratios"].items():
        lines.append(f"- **{name}: fastbyol / lightly = {x['ratio_median']:.2f}x** (medians of all steps); "
                     f"paired per round: median {x['ratio_paired_median']:.2f}x, fastbyol faster in "
                     f"{x['rounds_fastbyol_faster']}/{len(x['ratio_per_round'])} rounds "
                     f"({', '.join(f'{v:.2f}' for v in x['ratio_per_round'])}); segment means {x['ratio_mean']:.2f}x")
    lines.append(f"- verdict: {r['verdict']}")
    if r.get("breakdown_ms_per_batch"):
        lines += ["", "## Where the time goes (ms per batch, each piece alone, one process)", ""]
        for side, parts in r["breakdown_ms_per_batch"].items():
            for k, v in parts.items():
                lines.append(f"- {side}: {k}: {v:.1f} ms")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
