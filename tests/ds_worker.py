"""Test-only: one rank of a DeepSpeed run on fixed data, dumping what the tests compare.

    torchrun --standalone --nproc_per_node 2 tests/ds_worker.py OUT [--overflow-at K] [fastbyol train args]

``FixedChunks`` replaces the image loader so that runs on different numbers of ranks are
comparable sample for sample: at optimizer step s, rank r's m-th micro-batch is chunk
``m * world + r`` of that step, so W ranks x A accumulation steps see exactly the chunks a single
process with W*A accumulation steps sees, grouped into the same micro-batches. BatchNorm then
normalises over the same groups of samples in both runs (without SyncBN a rank's batch
statistics are its micro-batch's, as in one process's accumulation micro-step), and the
weights must agree up to summation order.

``--overflow-at K``: rank 0 makes one gradient infinite in its K-th micro-batch (0-based), the
way an fp16 overflow looks after the all-reduce on every rank.

``--record-syncs``: record the host syncs (:mod:`fastbyol.host_sync`) of every
``train_micro_batch`` call after the first two (warm-up: caches, DeepSpeed's first step) into
``record["syncs"]``, one list of strings per call.

Writes ``OUT/rank{r}.pt``: final online/target state_dicts, and per ``engine.step()`` call its
result, the trainer's step and lr before it, and (first calls) online/target parameter copies.
"""
from __future__ import annotations

import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbyol.data.base import TwoViewBatch  # noqa: E402


class FixedChunks:
    """A :class:`~fastbyol.data.base.TwoViewLoader` of deterministic random views (see module doc)."""

    def __init__(self, length: int, micro_batch: int, image_size: int, rank: int, world: int, accum: int,
                 device: torch.device):
        self.length, self.batch_size, self.size = length, micro_batch, image_size
        self.rank, self.world, self.accum, self.device = rank, world, accum, device
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.length

    @property
    def skipped(self) -> int:
        return 0

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_micro_batch

    def chunk(self, step_in_epoch: int, index: int) -> TwoViewBatch:
        g = torch.Generator().manual_seed(((self.epoch * 1000 + step_in_epoch) * 64 + index) * 7 + 1)
        v1, v2 = torch.randn(2, self.batch_size, 3, self.size, self.size, generator=g)
        cl = torch.channels_last
        return TwoViewBatch(v1.to(self.device, memory_format=cl), v2.to(self.device, memory_format=cl),
                            torch.zeros(self.batch_size, dtype=torch.long, device=self.device))

    def __iter__(self):
        for i in range(self.start, self.length):
            step, micro = divmod(i, self.accum)
            yield self.chunk(step, micro * self.world + self.rank)


def instrument(trainer, snapshots: int = 4, overflow_at: int = -1, rank: int = 0) -> Dict:
    """Record every ``engine.step()``; optionally poison one gradient on rank 0."""
    record = {"applied": [], "step_before": [], "lr_before": [], "online": [], "target": []}
    engine, model = trainer.engine, trainer.model
    calls = {"n": 0}
    if overflow_at >= 0 and rank == 0:
        first = next(model.online.parameters())
        first.register_hook(lambda g: torch.full_like(g, float("inf")) if calls["n"] == overflow_at else g)
    inner = engine.step

    def step():
        record["step_before"].append(trainer.step)
        record["lr_before"].append(float(engine.optimizer.param_groups[0]["lr"]))
        applied = inner()
        record["applied"].append(applied)
        if calls["n"] < snapshots:
            record["online"].append([p.detach().clone() for p in model.online.parameters()])
            record["target"].append([p.detach().clone() for p in model.target.parameters()])
        calls["n"] += 1
        return applied

    engine.step = step
    record["initial_online"] = [p.detach().clone() for p in model.online.parameters()]
    record["initial_target"] = [p.detach().clone() for p in model.target.parameters()]
    return record


def record_syncs(trainer, record: Dict, warmup: int = 2) -> None:
    from fastbyol.host_sync import record_host_syncs

    inner, record["syncs"], calls = trainer.train_micro_batch, [], [0]

    def train_micro_batch(batch):
        calls[0] += 1
        if calls[0] <= warmup:
            return inner(batch)
        with record_host_syncs() as syncs:
            result = inner(batch)
        record["syncs"].append([str(s) for s in syncs])
        return result

    trainer.train_micro_batch = train_micro_batch


def train_on_fixed_chunks(cfg, dist, engine: str = "deepspeed", overflow_at: int = -1,
                          syncs: bool = False) -> Dict:
    """Build the trainer (DeepSpeed or local), swap in FixedChunks, fit, return the record."""
    from fastbyol.parts import build_parts
    from fastbyol.runtime import micro_batch_size
    from fastbyol.trainer import Trainer

    factory = None
    if engine == "deepspeed":
        from fastbyol.launch import deepspeed_engine_factory

        factory = deepspeed_engine_factory(cfg, dist)
    parts = build_parts(cfg, dist, engine_factory=factory)
    parts.loader = FixedChunks(len(parts.loader), micro_batch_size(cfg, dist.world_size), cfg.augment.image_size, dist.rank,
                               dist.world_size, cfg.dist.grad_accum, parts.device)
    trainer = Trainer(cfg, parts)
    record = instrument(trainer, overflow_at=overflow_at, rank=dist.rank)
    if syncs:
        record_syncs(trainer, record)
    summary = trainer.fit()
    record.update(steps=trainer.step, summary=summary,
                  online_state={k: v.detach().clone() for k, v in trainer.model.online.state_dict().items()},
                  target_state={k: v.detach().clone() for k, v in trainer.model.target.state_dict().items()},
                  final_target=[p.detach().clone() for p in trainer.model.target.parameters()])
    if engine == "deepspeed":
        scaler = trainer.engine.scaler
        record["scale"] = scaler.get_scale() if scaler is not None else None
    return record


def main(argv) -> None:
    out, args = argv[0], list(argv[1:])
    overflow_at = -1
    if "--overflow-at" in args:
        i = args.index("--overflow-at")
        overflow_at = int(args[i + 1])
        del args[i:i + 2]
    syncs = "--record-syncs" in args
    if syncs:
        args.remove("--record-syncs")
    from fastbyol.cli import build_parser, resolve_config
    from fastbyol.runtime import dist_info_from_env

    cfg = resolve_config(build_parser().parse_args(["train", *args]))
    dist = dist_info_from_env()
    record = train_on_fixed_chunks(cfg, dist, "deepspeed", overflow_at, syncs)
    torch.save(record, os.path.join(out, f"rank{dist.rank}.pt"))
    import torch.distributed as tdist

    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
