"""Pick the engine from how the process was launched: plain, or DeepSpeed/torchrun."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from .config import Config
from .errors import FastByolError
from .trainer import DistInfo, Trainer


def dist_info_from_env() -> DistInfo:
    """Rank and world size as set by ``deepspeed``, ``torchrun`` or a hostfile launcher."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def run_training(cfg: Config) -> Optional[Dict]:
    """Train with DeepSpeed when asked to (``--deepspeed``) or launched on several ranks;
    returns the summary on rank 0 (None elsewhere). A run that fails before writing anything
    leaves no empty ``--out`` folder behind (the writability check creates it early)."""
    dist = dist_info_from_env()
    missing = missing_folders(cfg.train.out) if dist.is_main else []
    try:
        return _run(cfg, dist)
    except BaseException:
        for folder in missing:  # deepest first; rmdir refuses a folder that holds anything
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise


def missing_folders(path: str) -> List[str]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    out, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _run(cfg: Config, dist: DistInfo) -> Optional[Dict]:
    if cfg.dist.deepspeed or dist.world_size > 1:
        from .deepspeed_engine import run_deepspeed

        return run_deepspeed(cfg, dist)
    if cfg.dist.zero_stage:
        raise FastByolError(f"--zero-stage {cfg.dist.zero_stage} needs DeepSpeed: add --deepspeed true "
                            "(or launch with deepspeed/torchrun)")
    return Trainer(cfg, dist).fit()
