"""What a process needs before it trains or evaluates: its rank, its device, its seeds, a
writable output folder. Below everything that runs a job (trainer, engines, eval, benchmarks)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import FastByolError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise FastByolError("--train.device cuda requested but CUDA is not available")
        torch.backends.cudnn.benchmark = True  # training batches never change shape (always full): tune once
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dist_info_from_env() -> DistInfo:
    """Rank and world size as set by ``deepspeed``, ``torchrun`` or a hostfile launcher."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def check_writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        raise FastByolError(f"cannot write to --out {out!r}: {e.strerror or e}") from None


def micro_batch_size(cfg, world_size: int) -> int:
    """One rank's micro-batch: ``train.batch_size`` over ``world_size`` ranks and ``dist.grad_accum``
    accumulated micro-batches (the trainer's and DeepSpeed's batch fields both come from it)."""
    batch, accum = cfg.train.batch_size, cfg.dist.grad_accum
    if batch % (world_size * accum):
        raise FastByolError(f"train.batch_size {batch} is not divisible by world size {world_size} x "
                            f"dist.grad_accum {accum}")
    return batch // (world_size * accum)
