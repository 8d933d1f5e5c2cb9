"""Pick the engine from how the process was launched: plain, or DeepSpeed/torchrun."""
from __future__ import annotations

import os
from typing import Dict, Optional

from .config import Config
from .errors import FastByolError
from .trainer import DistInfo, Trainer


def dist_info_from_env() -> DistInfo:
    """Rank and world size as set by ``deepspeed``, ``torchrun`` or a hostfile launcher."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def run_training(cfg: Config) -> Optional[Dict]:
    """Train with DeepSpeed when asked to (``--deepspeed``) or launched on several ranks;
    returns the summary on rank 0 (None elsewhere)."""
    dist = dist_info_from_env()
    if cfg.dist.deepspeed or dist.world_size > 1:
        from .deepspeed_engine import run_deepspeed

        return run_deepspeed(cfg, dist)
    if cfg.dist.zero_stage:
        raise FastByolError(f"--zero-stage {cfg.dist.zero_stage} needs DeepSpeed: add --deepspeed true "
                            "(or launch with deepspeed/torchrun)")
    return Trainer(cfg, dist).fit()
