"""Test-only: the training monitor's kNN on one rank of a 2-process gloo group.

    torchrun --standalone --nproc_per_node 2 tests/eval_worker.py OUT DATA

Builds the smoke-preset Trainer (local engine; the weights are the same on every rank, from
the seed) and writes ``OUT/rank{r}.pt``: ``Trainer.knn()`` and the gathered bank features.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def knn_record(out: str, data: str, rank: int = 0, world: int = 1) -> dict:
    from fastbyol.config import apply_overrides, preset
    from fastbyol.data.eval_views import eval_loader
    from fastbyol.eval.features import extract_features
    from fastbyol.runtime import DistInfo
    from fastbyol.trainer import Trainer

    cfg = apply_overrides(preset("smoke"), {"data.data": data, "train.out": out, "train.kernels": "torch",
                                            "train.device": "cpu", "train.knn_k": 5})
    trainer = Trainer.from_config(cfg, DistInfo(rank, world, rank))
    loader = eval_loader(trainer.train_src, cfg.augment.image_size, 7, 0, rank=rank, world_size=world)
    bank = extract_features(trainer.model.online.encoder, loader, trainer.device, cfg.augment)
    return {"knn": trainer.knn(), "feats": bank.feats, "labels": bank.labels, "index": bank.index,
            "unreadable": bank.unreadable}


if __name__ == "__main__":
    out, data = sys.argv[1:3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tdist.init_process_group("gloo")
    torch.save(knn_record(os.path.join(out, f"run{rank}"), data, rank, world), os.path.join(out, f"rank{rank}.pt"))
    tdist.barrier()
    tdist.destroy_process_group()
