"""fastbyol.compat.byol_pytorch vs byol-pytorch 0.9.1 itself: the README's training step, side by side.

One step = ``loss = learner(images); opt.zero_grad(); loss.backward(); opt.step();
learner.update_moving_average()`` with Adam 3e-4, on the same network (torchvision ResNet-18,
``hidden_layer='avgpool'``, the README's 4096/256 MLPs, ``use_simplicial_embeddings=False``),
the same initial weights and the same input batch. The learners alternate step by step, so
both see the same machine load; the table gives medians of the timed steps.

Rows:
  identity augmentation   ``augment_fn=nn.Identity()``: the learners alone (networks, loss, EMA)
  default augmentation    each library's own default: byol-pytorch's torchvision pipeline (one
                          draw per batch, 3x3 blur), fastbyol's BYOL views (per-image draws, the
                          paper's blur and solarisation): more work per step, not the same work
  compat, per-view BN     ``views_in_one_batch=False`` (two forwards of B instead of one of 2B)

    python -m fastbyol.bench.compat [--batch 32] [--size 32] [--repeats 15] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn
from fastbyol.bench.common import load_byol_pytorch_learner, markdown_table, stamp, write_json


def load_byol_pytorch():
    try:
        return load_byol_pytorch_learner()
    except ImportError as e:
        sys.exit(str(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: it would time the Triton interpreter, not the CPU path users run")
    import torchvision

    from fastbyol.compat.byol_pytorch import BYOL

    bp = load_byol_pytorch()
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    x = torch.rand(args.batch, 3, args.size, args.size)
    kw = dict(image_size=args.size, hidden_layer="avgpool")

    def learners(augment_fn, extra):
        out = {"byol-pytorch 0.9.1": bp.BYOL(copy.deepcopy(net), use_simplicial_embeddings=False,
                                              augment_fn=augment_fn, **kw)}
        for name, more in extra.items():
            out[name] = BYOL(copy.deepcopy(net), augment_fn=augment_fn, **kw, **more)
        return out

    cases = {
        "identity augmentation": learners(nn.Identity(), {
            "fastbyol compat": {}, "fastbyol compat, per-view BN": {"views_in_one_batch": False}}),
        "default augmentation": learners(None, {"fastbyol compat": {}}),
    }
    rows = []
    for case, ls in cases.items():
        opts = {name: torch.optim.Adam(ln.parameters(), lr=3e-4) for name, ln in ls.items()}
        times = {name: [] for name in ls}
        for i in range(args.warmup + args.repeats):
            for name, ln in ls.items():
                t0 = time.perf_counter()
                loss = ln(x)
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                ln.update_moving_average()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            print(f"{case}: step {i + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
        ref = times["byol-pytorch 0.9.1"]
        for name, t in times.items():
            q = statistics.quantiles(t, n=4)
            rows.append({"case": case, "learner": name, "median_ms": statistics.median(t) * 1e3,
                         "p25_ms": q[0] * 1e3, "p75_ms": q[2] * 1e3,
                         "time_vs_byol_pytorch": statistics.median(t) / statistics.median(ref),
                         # each step against byol-pytorch's step right before it: robust to load drifting
                         "paired_ratio_median": statistics.median(a / b for a, b in zip(t, ref))})
    print(markdown_table(rows, ["case", "learner", "median_ms", "p25_ms", "p75_ms", "time_vs_byol_pytorch",
                                "paired_ratio_median"]))
    result = {**stamp(torch.device("cpu")), "network": "torchvision resnet18, hidden_layer avgpool, MLPs 4096/256",
              "batch": args.batch, "image_size": args.size, "repeats": args.repeats, "warmup": args.warmup,
              "optimizer": "Adam 3e-4", "rows": rows}
    print("wrote", write_json(result, "compat_vs_byol_pytorch_cpu.json", args.out))


if __name__ == "__main__":
    main()
