"""BYOL loss forward+backward: fused Triton kernels vs eager PyTorch vs the byte floor.

GPU: B = 4096, D = 256 (both pairs of the symmetric loss), fp32 and bf16 inputs, gradients
for the predictions p1, p2 (the targets z1, z2 are detached, as in BYOL).
  eager    — ``F.normalize`` on each side, ``2 − 2·sum``, mean, autograd backward
  fastbyol — ``fastbyol_kernels.byol_loss`` (one forward and one backward launch)
  floor    — bytes an ideal fwd+bwd moves (read p1, p2, z1, z2 in each pass, write the
             gradients of p1, p2: 10·B·D elements) ÷ device copy bandwidth measured in this run
Each is timed two ways: ``launched`` (called from Python each step: host overheads included
where the host falls behind the GPU) and ``graph`` (the same step captured in a CUDA graph and
replayed: GPU time only). The L2 cache is flushed before every call, since at this size the
inputs (16 MB in fp32) would otherwise stay in the H100's 50 MB L2 and beat the memory floor.
CPU (``--cpu`` or no CUDA): B = 64, D = 32 smoke mode, launched only; Triton only under
TRITON_INTERPRET=1 (the interpreter, not a kernel).
Columns: median time, x_floor (time ÷ floor), ours_speedup (the row's time ÷ fastbyol's in the
same mode), max_abs_diff (loss and gradients against fastbyol's).

    python -m fastbyol.bench.loss [--cpu] [--batch B] [--dim D] [--repeats N] [--out DIR]
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from fastbyol.bench.common import (copy_bandwidth, cuda_graph, micro_parser, pick_device, report, stamp, time_fn,
                     triton_runs_here)


def eager_loss(p1, p2, z1, z2):
    """The loss as written in plain PyTorch (byol-pytorch, lightly, solo-learn)."""
    def rows(p, z):
        return 2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)

    return (rows(p1, z2) + rows(p2, z1)).mean()


def main(argv=None):
    ap = micro_parser(__doc__)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    args = ap.parse_args(argv)
    device = pick_device(args.cpu)
    gpu = device.type == "cuda"
    B = args.batch or (4096 if gpu else 64)
    D = args.dim or (256 if gpu else 32)
    repeats = args.repeats or (200 if gpu else 5)
    from fastbyol_kernels import byol_loss

    notes = [] if gpu else ["CPU smoke mode: timings show overheads, not GPU behaviour"]
    ours_name = "fastbyol byol_loss (Triton)"
    methods = {"eager PyTorch (F.normalize)": eager_loss}
    if triton_runs_here(device):
        methods[ours_name] = lambda *a: byol_loss(*a, backend="triton")
        if not gpu:
            notes.append("the Triton row runs under TRITON_INTERPRET=1: it times the interpreter, not a kernel")
    else:
        notes.append("Triton row skipped: no CUDA device and TRITON_INTERPRET is not 1")

    bw = copy_bandwidth(device, nbytes=(1 << 30) if gpu else (1 << 24))
    rows = []
    for dtype in ([torch.float32, torch.bfloat16] if gpu else [torch.float32]):
        g = torch.Generator(device=device).manual_seed(0)
        p1, p2 = [torch.randn(B, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(2)]
        z1, z2 = [torch.randn(B, D, device=device, dtype=dtype, generator=g) for _ in range(2)]
        floor = 10 * B * D * p1.element_size() / bw
        dname = str(dtype).replace("torch.", "")

        def step(fn):
            def run():
                p1.grad = p2.grad = None
                loss = fn(p1, p2, z1, z2)
                loss.backward()
                return loss
            return run

        # Equal maths: loss and gradients of one step of each, against ours (or eager).
        outs = {}
        for name, fn in methods.items():
            loss = step(fn)()
            outs[name] = [x.detach().float().clone() for x in (loss, p1.grad, p2.grad)]
        ref = outs.get(ours_name, outs["eager PyTorch (F.normalize)"])

        modes = [("launched", lambda run: run)] + ([("graph", lambda run: cuda_graph(run, device))] if gpu else [])
        for mode, wrap in modes:
            mode_rows = []
            for name, fn in methods.items():
                t = time_fn(wrap(step(fn)), device, repeats=repeats, warmup=5, flush_l2=gpu)["median_s"]
                diff = max((a - b).abs().max().item() for a, b in zip(outs[name], ref))
                mode_rows.append({"dtype": dname, "mode": mode, "method": name, "time_us": t * 1e6,
                                  "x_floor": t / floor, "max_abs_diff": diff})
            ours = next((r for r in mode_rows if r["method"] == ours_name), None)
            for r in mode_rows:
                r["ours_speedup"] = r["time_us"] / ours["time_us"] if ours else None
            rows += mode_rows
        rows.append({"dtype": dname, "mode": "", "method": "byte floor: 10·B·D elements / copy bandwidth",
                     "time_us": floor * 1e6, "x_floor": 1.0})
    result = {"benchmark": "loss", **stamp(device), "B": B, "D": D, "repeats": repeats,
              "grads_for": ["p1", "p2"], "copy_bandwidth_GBps": bw / 1e9, "rows": rows,
              "note": "; ".join(notes) or None}
    print(f"BYOL loss fwd+bwd, B={B}, D={D} on {result['device']}, median of {repeats}")
    report(result, ["dtype", "mode", "method", "time_us", "x_floor", "ours_speedup", "max_abs_diff"],
           f"loss_{'gpu' if gpu else 'cpu'}.json", args.out)
    return result


if __name__ == "__main__":
    main()
