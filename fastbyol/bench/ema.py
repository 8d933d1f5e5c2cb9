"""Target-network EMA: fused multi-tensor kernel vs the ways peers do it, vs the byte floor.

GPU: ResNet-50 + BYOL projector (~33 M parameters in ~165 tensors), fp32.
  (a) per-parameter loop   — byol-pytorch / solo-learn: ``t.mul_(m).add_(o, alpha=1-m)`` per tensor
  (b) two-pass foreach     — lightly: ``_foreach_mul_`` then ``_foreach_add_``
  (c) ``_foreach_lerp_``   — timm's ModelEmaV3
  (d) fastbyol             — ``fastbyol_kernels.ema_update_`` (one launch)
  (e)-(h) whole-module EMAs — ``AveragedModel`` with torch's / fastbyol's ``get_ema_multi_avg_fn``,
                             timm's / fastbyol's ``ModelEmaV3`` (parameters and buffers; timm if installed)
  auto                     — ``ema_update_(backend="auto")``: what users get (the reference on CPU)
  floor                    — 12 bytes/parameter ÷ device copy bandwidth measured in this run
CPU (``--cpu`` or no CUDA): a small MLP, so CI can smoke-test the script; the Triton row runs
only under TRITON_INTERPRET=1 (and then measures the interpreter, not a kernel).
Columns: median time per update, effective GB/s (12 B/param ÷ time), x_floor (time ÷ floor),
ours_speedup (the row's time ÷ fastbyol's: above 1, fastbyol is faster), max_abs_diff (one
update from the same state, against fastbyol's).

    python -m fastbyol.bench.ema [--cpu] [--repeats N] [--out DIR]
"""
from __future__ import annotations


import torch
from torch import nn
from fastbyol.bench.common import copy_bandwidth, micro_parser, pick_device, report, stamp, time_fn, triton_runs_here


def resnet50_byol_target(device):
    """ResNet-50 encoder (fc removed) + BYOL projector 2048→4096→BN→ReLU→256: ~33 M params."""
    import torchvision

    enc = torchvision.models.resnet50()
    enc.fc = nn.Identity()
    proj = nn.Sequential(nn.Linear(2048, 4096), nn.BatchNorm1d(4096), nn.ReLU(), nn.Linear(4096, 256))
    return nn.ModuleList([enc, proj]).to(device)


def small_mlp(device):
    """A few-tensor stand-in for CPU smoke runs."""
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 32)).to(device)


def whole_module_emas(target, online, m):
    """{row: (one update of a copy of ``target`` toward ``online``, that copy's parameters)}."""
    import fastbyol_kernels as fk
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    rows = {}
    for label, make_fn in (("torch", get_ema_multi_avg_fn), ("fastbyol", fk.get_ema_multi_avg_fn)):
        avg = AveragedModel(target, multi_avg_fn=make_fn(m))
        avg.n_averaged.fill_(1)  # past AveragedModel's first (copying) update
        rows[f"AveragedModel + {label} get_ema_multi_avg_fn"] = (lambda avg=avg: avg.update_parameters(online),
                                                                 list(avg.module.parameters()))
    classes = [("fastbyol", fk.ModelEmaV3)]
    try:
        from timm.utils.model_ema import ModelEmaV3

        classes.insert(0, ("timm", ModelEmaV3))
    except ImportError:
        pass
    for label, cls in classes:
        ema = cls(target, decay=m)
        rows[f"{label} ModelEmaV3 (params + BN buffers)"] = (lambda ema=ema: ema.update(online),
                                                            list(ema.module.parameters()))
    return rows


def main(argv=None):
    ap = micro_parser(__doc__)
    args = ap.parse_args(argv)
    device = pick_device(args.cpu)
    gpu = device.type == "cuda"
    repeats = args.repeats or (100 if gpu else 5)
    from fastbyol_kernels import ema_update_

    torch.manual_seed(0)
    online = resnet50_byol_target(device) if gpu else small_mlp(device)
    target = resnet50_byol_target(device) if gpu else small_mlp(device)
    ts, os_ = [p.data for p in target.parameters()], [p.data for p in online.parameters()]
    n_params = sum(t.numel() for t in ts)
    m = 0.996

    def loop(ts):
        for t, o in zip(ts, os_):
            t.mul_(m).add_(o, alpha=1 - m)

    def two_pass(ts):
        torch._foreach_mul_(ts, m)
        torch._foreach_add_(ts, os_, alpha=1 - m)

    def lerp(ts):
        torch._foreach_lerp_(ts, os_, 1 - m)

    modes = {"(a) per-parameter loop (byol-pytorch, solo-learn)": loop, "(b) foreach mul+add (lightly)": two_pass,
             "(c) foreach lerp (timm ModelEmaV3)": lerp}
    notes = [] if gpu else ["CPU smoke mode: tiny model; timings show overheads, not GPU behaviour"]
    if triton_runs_here(device):
        modes["(d) fastbyol ema_update_ (Triton)"] = lambda ts: ema_update_(ts, os_, m, backend="triton")
        if not gpu:
            notes.append("the Triton row runs under TRITON_INTERPRET=1: it times the interpreter, not a kernel")
    else:
        notes.append("Triton row skipped: no CUDA device and TRITON_INTERPRET is not 1")
    modes["fastbyol ema_update_ (auto)"] = lambda ts: ema_update_(ts, os_, m)
    ours_name = next((n for n in modes if "fastbyol" in n), None)

    # Equal maths: one update of each from the same target, compared with ours (or lerp).
    first = {}
    for name, fn in modes.items():
        copies = [t.clone() for t in ts]
        fn(copies)
        first[name] = copies
    check = first[ours_name or "(c) foreach lerp (timm ModelEmaV3)"]
    for name, (fn, params) in whole_module_emas(target, online, m).items():
        fn()  # one update from the target's state, as above
        first[name] = [p.detach().clone() for p in params]
        modes[name] = lambda ts, fn=fn: fn()

    bw = copy_bandwidth(device, nbytes=(1 << 30) if gpu else (1 << 24))
    floor = 12 * n_params / bw
    rows = []
    for name, fn in modes.items():
        t = time_fn(lambda: fn(ts), device, repeats=repeats, warmup=3)["median_s"]
        diff = max((a - b).abs().max().item() for a, b in zip(first[name], check))
        rows.append({"method": name, "time_us": t * 1e6, "GB/s": 12 * n_params / t / 1e9, "x_floor": t / floor,
                     "max_abs_diff": diff})
    ours = next((r for r in rows if r["method"] == ours_name), None)
    for r in rows:
        r["ours_speedup"] = r["time_us"] / ours["time_us"] if ours else None
    rows.append({"method": "floor: 12 B/param / copy bandwidth", "time_us": floor * 1e6, "GB/s": bw / 1e9,
                 "x_floor": 1.0})
    result = {"benchmark": "ema", **stamp(device), "params": n_params, "tensors": len(ts), "momentum": m,
              "dtype": "float32", "repeats": repeats, "copy_bandwidth_GBps": bw / 1e9, "rows": rows,
              "model": "ResNet-50 + BYOL projector" if gpu else "MLP 64-128-32 with BatchNorm (smoke)",
              "note": "; ".join(notes) or None}
    print(f"EMA over {len(ts)} tensors, {n_params:,} parameters ({result['model']}) on {result['device']}, "
          f"median of {repeats}")
    report(result, ["method", "time_us", "GB/s", "x_floor", "ours_speedup", "max_abs_diff"],
           f"ema_{'gpu' if gpu else 'cpu'}.json", args.out)
    return result


if __name__ == "__main__":
    main()
