"""LARS step: fastbyol's multi-tensor, sync-free LARS vs a per-parameter loop vs the byte floor.

GPU: the online network of BYOL ResNet-50 (encoder + projector + predictor: 35.1 M parameters
in 171 tensors), fp32, grouped as in training (weights: decay + trust ratio; biases and
BatchNorm: neither).
  (a) per-parameter loop   — the lightly / solo-learn style: a Python loop over tensors, two
                             norms, a ``torch.where`` trust ratio and the momentum update each
  (b) fastbyol LARS        — ``fastbyol.optim.LARS``: ``torch._foreach_*`` over each group, all
                             trust ratios as one tensor, no host sync (``backend="torch"``)
  (b') fastbyol LARS Triton — the same class with ``backend="triton"`` (GPU only): per-tensor
                             norms in one launch, the update in one more per group; reads and
                             writes exactly the floor's bytes (fastbyol_kernels/lars.py)
  (c) apex LARC + SGD      — NVIDIA's LARS wrapper, only when apex is installed (never required)
  context                  — ``torch.optim.SGD(foreach=True)`` with momentum: the same
                             traffic minus the norms' pass, i.e. what the trust ratio costs
  floor                    — 28 bytes per adapted parameter (read w, g for the norms; read w,
                             g, buf and write buf, w for the update) and 20 per excluded one,
                             ÷ the device copy bandwidth measured in this run
Every method starts from the same weights, gradients and momentum; the table reports how far
each one's first step lands from fastbyol's (``max_abs_diff``), so the timings compare
equal maths.
CPU (``--cpu`` or no CUDA): a small convnet BYOL (0.5 M parameters), so CI can smoke-test it.

    python -m fastbyol.bench.lars [--cpu] [--repeats N] [--out DIR]
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from fastbyol.bench.common import copy_bandwidth, micro_parser, pick_device, report, stamp, time_fn
from fastbyol.bench.baselines import PerParameterLARS
from fastbyol.optim import LARS, param_groups

LR, MOMENTUM, WD, ETA = 1e-3, 0.9, 1.5e-6, 1e-3


def online_network(device: torch.device, gpu: bool) -> torch.nn.Module:
    from fastbyol.model import BYOL

    if gpu:
        model = BYOL("resnet50", loss_fn=lambda *a: None)
    else:
        model = BYOL("convnet4", projector_hidden=256, predictor_hidden=256, projection_dim=64, loss_fn=lambda *a: None)
    return model.online.to(device)


def clone_setup(reference: torch.nn.Module, grads: List[torch.Tensor]):
    """A fresh copy of the network with the shared gradients attached."""
    import copy

    net = copy.deepcopy(reference)
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    return net


def builders(gpu: bool = False) -> Dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    def groups(net):
        return param_groups(net, WD)

    def sgd(net):
        return torch.optim.SGD([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups(net)],
                               lr=LR, momentum=MOMENTUM, foreach=True)

    out = {
        "per-parameter loop (lightly, solo-learn)": lambda net: PerParameterLARS(groups(net), LR, MOMENTUM, WD, ETA),
        "fastbyol LARS (foreach, sync-free)": lambda net: LARS(groups(net), lr=LR, momentum=MOMENTUM,
                                                                trust_coefficient=ETA, backend="torch"),
    }
    if gpu:  # the kernels on CUDA (on CPU they would run interpreted: not a timing)
        out["fastbyol LARS Triton (2 launches/group)"] = lambda net: LARS(
            groups(net), lr=LR, momentum=MOMENTUM, trust_coefficient=ETA, backend="triton")
    try:  # optional: NVIDIA apex's LARC wrapping SGD (per-parameter loop inside)
        from apex.parallel.LARC import LARC

        def apex_larc(net):
            return LARC(torch.optim.SGD([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups(net)],
                                        lr=LR, momentum=MOMENTUM), trust_coefficient=ETA, clip=False)

        out["apex LARC + SGD"] = apex_larc
    except ImportError:
        pass
    out["context: torch SGD foreach (no trust ratio)"] = sgd
    return out


def main(argv=None) -> Dict:
    ap = micro_parser(__doc__)
    args = ap.parse_args(argv)
    device = pick_device(args.cpu)
    gpu = device.type == "cuda"
    repeats = args.repeats or (50 if gpu else 10)

    torch.manual_seed(0)
    reference = online_network(device, gpu)
    grads = [torch.randn_like(p) * 1e-2 for p in reference.parameters()]
    groups = param_groups(reference, WD)
    n_adapted = sum(p.numel() for p in groups[0]["params"])
    n_excluded = sum(p.numel() for p in groups[1]["params"])
    n_tensors = sum(len(g["params"]) for g in groups)
    floor_bytes = 28 * n_adapted + 20 * n_excluded
    bw = copy_bandwidth(device, nbytes=(1 << 30) if gpu else (1 << 24))
    floor = floor_bytes / bw

    # Correctness: one step of each from identical state, compared with fastbyol's.
    first_step = {}
    for name, build in builders(gpu).items():
        net = clone_setup(reference, grads)
        build(net).step()
        first_step[name] = [p.detach().clone() for p in net.parameters()]
    ours_name = next(n for n in first_step if n.startswith("fastbyol LARS (foreach"))

    rows = []
    for name, build in builders(gpu).items():
        net = clone_setup(reference, grads)
        opt = build(net)
        t = time_fn(opt.step, device, repeats=repeats, warmup=3)["median_s"]
        diff = max((a - b).abs().max().item() for a, b in zip(first_step[name], first_step[ours_name]))
        rows.append({"method": name, "time_us": t * 1e6, "GB/s": floor_bytes / t / 1e9, "x_floor": t / floor,
                     "max_abs_diff": None if name.startswith("context") else diff})
        del net, opt
    ours = next(r for r in rows if r["method"] == ours_name)
    for r in rows:
        r["ours_speedup"] = r["time_us"] / ours["time_us"]
    rows.append({"method": "floor: 28 B/param (20 excluded) / copy bandwidth", "time_us": floor * 1e6,
                 "GB/s": bw / 1e9, "x_floor": 1.0})
    result = {"benchmark": "lars", **stamp(device), "params": n_adapted + n_excluded, "adapted_params": n_adapted,
              "excluded_params": n_excluded, "tensors": n_tensors, "copy_bandwidth_GBps": bw / 1e9,
              "repeats": repeats, "rows": rows,
              "model": "BYOL ResNet-50 online network" if gpu else "BYOL convnet4 online network (smoke)",
              "note": None if gpu else "CPU smoke mode: small model; timings show overheads, not GPU behaviour"}
    print(f"LARS step over {n_tensors} tensors, {n_adapted + n_excluded:,} parameters "
          f"({result['model']}) on {result['device']}, median of {repeats}")
    report(result, ["method", "time_us", "GB/s", "x_floor", "ours_speedup", "max_abs_diff"],
           f"lars_{'gpu' if gpu else 'cpu'}.json", args.out)
    return result


if __name__ == "__main__":
    main()
