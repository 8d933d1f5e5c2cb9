"""Data-parallel scaling: an ESTIMATE for N devices from one device's step, and a MEASURED
1 → 2 process run on CPU (gloo) of the trainer's own step."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Dict, List

import torch

from fastbyol.data.sources import load_source

from .configs import Context, bench_configs
from .fastbyol_runner import FastByolRunner


def scaling_estimate(step_s: float, grad_bytes: int, gbs: float, worlds=(1, 2, 4, 8)) -> List[Dict]:
    """ESTIMATE for N data-parallel devices at a fixed per-device batch: a ring all-reduce moves
    2(N−1)/N × the gradient bytes through each device's link; ``no_overlap`` adds that time to
    the step (upper bound on the step), ``full_overlap`` hides it behind the backward pass."""
    out = []
    for n in worlds:
        t_ar = 2 * (n - 1) / n * grad_bytes / (gbs * 1e9)
        out.append({"devices": n, "allreduce_ms": t_ar * 1e3, "step_ms_no_overlap": (step_s + t_ar) * 1e3,
                    "efficiency_no_overlap": step_s / (step_s + t_ar),
                    "efficiency_full_overlap": step_s / max(step_s, t_ar)})
    return out


def _scaling_worker(rank: int, world: int, port: int, cfg_name: str, batch: int, warmup: int, steps: int,
                    threads: int, data_root: str, out_path: str) -> None:
    import torch.distributed as dist

    from fastbyol.distributed import close_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = bench_configs()[cfg_name]
        ctx = Context(cfg, torch.device("cpu"), batch, "fp32", 0, "torch", load_source(data_root), seed=0,
                      allreduce=True)
        runner = FastByolRunner(ctx, loader="synthetic")  # the trainer's step; its engine all-reduces
        it = runner.batches()
        times = []
        dist.barrier()
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            runner.step(next(it))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        ar_times = runner.engine.allreduce_s[warmup:]
        res = torch.tensor([statistics.median(times), statistics.median(ar_times)], dtype=torch.float64)
        dist.all_reduce(res, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump({"step_s": res[0].item(), "allreduce_s": res[1].item(),
                           "grad_bytes": sum(p.numel() * 4 for p in runner.online_params)}, fh)
        runner.close()
    finally:
        close_process_group()


def gloo_scaling(cfg_name: str, batch: int, warmup: int, steps: int, data_root: str, log=print) -> Dict:
    """MEASURED on CPU: step time of data-parallel BYOL at 1 and 2 processes (gloo), fixed
    per-process batch and one thread per process (so 2 processes use the cores 1 leaves idle)."""
    import torch.multiprocessing as mp

    from fastbyol.distributed import free_port

    threads = max(1, (os.cpu_count() or 2) // 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            path = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_scaling_worker, args=(world, free_port(), cfg_name, batch, warmup, steps, threads, data_root, path),
                     nprocs=world, join=True)
            with open(path) as fh:
                r = json.load(fh)
            r.update(processes=world, img_s=world * batch / r["step_s"])
            rows.append(r)
            log(f"  gloo {world} process(es): step {r['step_s'] * 1e3:.1f} ms, all-reduce {r['allreduce_s'] * 1e3:.1f} ms, "
                f"{r['img_s']:.1f} img/s")
    base = rows[0]
    for r in rows:
        r["speedup"] = r["img_s"] / base["img_s"]
        r["efficiency"] = r["speedup"] / r["processes"]
    return {"config": cfg_name, "per_process_batch": batch, "threads_per_process": threads, "backend": "gloo",
            "inputs": "synthetic views (compute + communication only)",
            "allreduce": "one flat fp32 bucket after backward (no overlap)", "rows": rows}
