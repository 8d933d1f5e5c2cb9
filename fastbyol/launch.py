"""Start a training run the way the process was launched: plain, or DeepSpeed/torchrun.

``run_training(cfg)`` is what ``fastbyol train`` calls. On one plain process it trains with the
local engine; launched by ``deepspeed``/``torchrun`` (or ``--deepspeed true``) it joins the process
group and trains with the DeepSpeed engine (:mod:`fastbyol.engines`). The trainer is the same.
"""
from __future__ import annotations

import os
from datetime import timedelta
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as tdist

from .config import Config
from .distributed import backend_for, close_process_group, ensure_env
from .engines.deepspeed_config import deepspeed_config
from .engines.deepspeed_engine import import_deepspeed, make_engine
from .errors import FastByolError
from .parts import EngineFactory
from .runtime import DistInfo, dist_info_from_env, resolve_device
from .trainer import Trainer


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
        return run_deepspeed(cfg, dist)
    if cfg.dist.zero_stage:
        raise FastByolError(f"--zero-stage {cfg.dist.zero_stage} needs DeepSpeed: add --deepspeed true "
                            "(or launch with deepspeed/torchrun)")
    return Trainer.from_config(cfg, dist).fit()


def deepspeed_engine_factory(cfg: Config, dist: DistInfo, optimizer_factory=None) -> EngineFactory:
    """Join (or create) the process group; the ``engine_factory`` of
    :func:`~fastbyol.parts.build_parts` that puts the model on the DeepSpeed engine
    (``optimizer_factory(params)`` replaces the configured optimizer). Configuration errors are
    raised before any process group exists."""
    cfg.validate()
    ds_config = deepspeed_config(cfg, dist.world_size)
    device = resolve_device(cfg.train.device, dist)
    deepspeed = import_deepspeed(device)
    ensure_env()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL, so each rank's communicator lives on its own GPU
    if not tdist.is_initialized():
        # The timeout bounds every collective, including the ranks' wait for a slow kNN or
        # checkpoint: torch's NCCL default (10 min) is too short for ImageNet's kNN.
        deepspeed.init_distributed(dist_backend=backend_for(device), verbose=False,
                                   timeout=timedelta(minutes=cfg.dist.timeout_minutes))
    if tdist.get_world_size() != dist.world_size:
        raise FastByolError(f"launcher says WORLD_SIZE={dist.world_size} but the process group has "
                            f"{tdist.get_world_size()} ranks")
    return partial(make_engine, ds_config=ds_config, optimizer_factory=optimizer_factory)


def deepspeed_trainer(cfg: Config, dist: DistInfo) -> Trainer:
    """The :class:`Trainer` of ``cfg`` on the DeepSpeed engine (:func:`deepspeed_engine_factory`)."""
    return Trainer.from_config(cfg, dist, engine_factory=deepspeed_engine_factory(cfg, dist))


def run_deepspeed(cfg: Config, dist: DistInfo) -> Optional[Dict]:
    """Train under DeepSpeed; the summary on rank 0, None on the other ranks."""
    from .stop import TrainingStopped

    try:
        summary = deepspeed_trainer(cfg, dist).fit()
    except TrainingStopped:  # every rank stopped at the same step, after the checkpoint
        close_process_group()
        raise
    # Only after success: on an error the launcher tears the job down, and tearing the group
    # down here could wait forever on ranks still inside a collective.
    close_process_group()
    return summary if dist.is_main else None
