"""BYOL loss forward+backward: fused Triton kernels vs eager PyTorch vs the byte floor.

GPU: B = 4096, D = 256 (both pairs of the symmetric loss), fp32 and bf16 inputs.
  eager    — ``F.normalize`` on each side, ``2 − 2·sum``, mean, autograd backward
  fastbyol — ``fastbyol_kernels.byol_loss`` (one forward and one backward launch)
  floor    — bytes read and written by an ideal fwd+bwd (read p1,p2,z1,z2 twice, write
             grad p1, p2) ÷ device copy bandwidth measured in this run
CPU (``--cpu`` or no CUDA): B = 64, D = 32 smoke mode; Triton only under TRITON_INTERPRET=1.

    python benchmarks/bench_loss.py [--cpu] [--batch B] [--dim D] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_bandwidth, markdown_table, pick_device, stamp, time_fn, triton_runs_here, write_json  # noqa: E402


def eager_loss(p1, p2, z1, z2):
    def rows(p, z):
        return 2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)

    return (rows(p1, z2) + rows(p2, z1)).mean()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = pick_device(args.cpu)
    gpu = device.type == "cuda"
    B = args.batch or (4096 if gpu else 64)
    D = args.dim if gpu else min(args.dim, 32)
    repeats = args.repeats or (200 if gpu else 5)
    from fastbyol_kernels import byol_loss

    bw = copy_bandwidth(device, nbytes=(1 << 30) if gpu else (1 << 24))
    rows = []
    for dtype in ([torch.float32, torch.bfloat16] if gpu else [torch.float32]):
        g = torch.Generator(device=device).manual_seed(0)
        p1, p2 = [torch.randn(B, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(2)]
        z1, z2 = [torch.randn(B, D, device=device, dtype=dtype, generator=g) for _ in range(2)]
        esize = p1.element_size()
        floor = (8 * B * D * esize + 2 * B * D * esize) / bw  # fwd reads 4, bwd reads 4 and writes 2

        def run(fn):
            def step():
                p1.grad = p2.grad = None
                fn(p1, p2, z1, z2).backward()
            return step

        modes = {"eager PyTorch (F.normalize)": run(eager_loss)}
        if triton_runs_here(device):
            modes["fastbyol byol_loss (Triton)"] = run(lambda *a: byol_loss(*a, backend="triton"))
        dt_rows = []
        for name, fn in modes.items():
            t = time_fn(fn, device, repeats=repeats, warmup=5)["median_s"]
            dt_rows.append({"dtype": str(dtype).replace("torch.", ""), "method": name, "time_us": t * 1e6,
                            "x_floor": t / floor})
        ours = next((r for r in dt_rows if r["method"].startswith("fastbyol")), None)
        for r in dt_rows:
            r["ours_speedup"] = r["time_us"] / ours["time_us"] if ours else None
        dt_rows.append({"dtype": str(dtype).replace("torch.", ""), "method": "byte floor", "time_us": floor * 1e6,
                        "x_floor": 1.0})
        rows += dt_rows
    result = {"benchmark": "loss", **stamp(device), "B": B, "D": D, "copy_bandwidth_GBps": bw / 1e9, "rows": rows,
              "note": None if gpu else "CPU smoke mode; Triton row (if any) is the interpreter"}
    print(f"BYOL loss fwd+bwd, B={B}, D={D} on {result['device']}")
    print(markdown_table(rows, ["dtype", "method", "time_us", "x_floor", "ours_speedup"]))
    path = write_json(result, f"loss_{'gpu' if gpu else 'cpu'}.json", args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
