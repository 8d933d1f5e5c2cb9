"""Test-only: one rank of two one-step DeepSpeed runs (``--dist.reduce_dtype fp32``, then
``bf16``), recording each rank's gradients just before and just after DeepSpeed's first
gradient all-reduce (ZeRO 0: ``DeepSpeedEngine.allreduce_gradients``) and the dtypes of the
floating-point tensors every collective of the run carried.

    torchrun --standalone --nproc_per_node 2 tests/ds_reduce_worker.py OUT [fastbyol train args]

Writes ``OUT/rank{r}.pt``: ``{reduce_dtype: {"before", "after", "comm_dtypes"}}``.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ds_worker import train_on_fixed_chunks  # noqa: E402

COLLECTIVES = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce", "all_gather_into_tensor",
               "all_gather", "all_reduce_coalesced")


def recording_collectives(seen: set):
    """Wraps torch.distributed's collectives (DeepSpeed's comm backend calls them by module
    attribute) to note every floating-point dtype they carry; returns the undo."""
    originals = {n: getattr(tdist, n) for n in COLLECTIVES if hasattr(tdist, n)}

    def wrap(fn):
        def inner(*args, **kwargs):
            for a in list(args) + list(kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1:
                        seen.add(str(t.dtype))
            return fn(*args, **kwargs)
        return inner

    for n, fn in originals.items():
        setattr(tdist, n, wrap(fn))
    return lambda: [setattr(tdist, n, fn) for n, fn in originals.items()]


def recording_reduction(grads: dict):
    """The first all-reduce's gradients, before and after (fp32 ``.grad`` of the online network)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    inner = DeepSpeedEngine.allreduce_gradients

    def allreduce_gradients(self, *a, **kw):
        params = [p for p in self.module.parameters() if p.requires_grad]
        first = "before" not in grads
        if first:
            grads["before"] = [p.grad.detach().clone() for p in params]
        out = inner(self, *a, **kw)
        if first:
            grads["after"] = [p.grad.detach().clone() for p in params]
        return out

    DeepSpeedEngine.allreduce_gradients = allreduce_gradients
    return lambda: setattr(DeepSpeedEngine, "allreduce_gradients", inner)


def main(argv) -> None:
    out, args = argv[0], list(argv[1:])
    from fastbyol.cli import build_parser, resolve_config
    from fastbyol.runtime import dist_info_from_env

    dist = dist_info_from_env()
    result = {}
    for reduce_dtype in ("fp32", "bf16"):
        cfg = resolve_config(build_parser().parse_args(
            ["train", *args, "--out", os.path.join(out, reduce_dtype), "--dist.reduce_dtype", reduce_dtype]))
        seen: set = set()
        grads: dict = {}
        undo, undo_grads = recording_collectives(seen), recording_reduction(grads)
        try:
            train_on_fixed_chunks(cfg, dist, "deepspeed")
        finally:
            undo()
            undo_grads()
        result[reduce_dtype] = dict(grads, comm_dtypes=sorted(seen))
    torch.save(result, os.path.join(out, f"rank{dist.rank}.pt"))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
