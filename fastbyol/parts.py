"""What a :class:`~fastbyol.trainer.Trainer` runs with, built from a config in one place.

:func:`build_parts` does a run's start-up in its fixed order (validate, check ``--out``, pick the
device, seed, then sources → loader → model → engine), so the model's initial weights are the
same draws from the seeded RNG however the parts are swapped. A caller with its own pieces (a
user's network and Dataset, :mod:`fastbyol.compat`; a benchmark's optimizer) passes factories
for those; the trainer itself never builds anything.

Examples:
    >>> parts = build_parts(cfg, DistInfo())                  # doctest: +SKIP
    >>> Trainer(cfg, parts).fit()                             # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Tuple

import torch

from .backbones import memory_format
from .config import Config
from .data import build_train_loader, resolve_sources
from .data.base import TwoViewLoader
from .engines import Engine, LocalEngine
from .errors import FastByolError
from .model import BYOL
from .optim import build_optimizer
from .runtime import DistInfo, check_writable, micro_batch_size, resolve_device, seed_everything
from .schedules import scaled_lr

log = logging.getLogger("fastbyol")

# engine_factory(model, cfg, device, dist) -> Engine
EngineFactory = Callable[[BYOL, Config, torch.device, DistInfo], Engine]


@dataclass
class TrainerParts:
    """A run's pieces, ready to train: what :class:`~fastbyol.trainer.Trainer` receives."""

    dist: DistInfo
    device: torch.device
    train_src: Any  # the training source (an ImageSource, or a user's Dataset): len, and classes for kNN
    val_src: Any  # the labelled kNN source; None where there is none (kNN off)
    loader: TwoViewLoader  # yields this rank's micro-batches
    model: BYOL
    engine: Engine
    data_description: str = "the embedded synthetic set"  # how the log and errors name the data
    rerunnable: bool = True  # False where the run is not a Config alone (a user's network and Dataset): no config.yaml


def build_model(cfg: Config, device: torch.device) -> BYOL:
    from fastbyol_kernels import byol_loss

    m = cfg.model
    model = BYOL(m.backbone, cifar_stem=m.cifar_stem, projector_hidden=m.projector_hidden,
                 projection_dim=m.projection_dim, predictor_hidden=m.predictor_hidden,
                 use_momentum=m.use_momentum, loss_fn=partial(byol_loss, backend=cfg.train.kernels))
    model = model.to(device, memory_format=memory_format(cfg, device))
    return model


def batch_too_large(cfg: Config, images: int, data: str) -> str:
    """The error for a global batch larger than the data set: the preset it came from, and the
    presets whose batch would fit."""
    from .config import PRESETS, preset

    fits = [f"--preset {name} (batch {c.train.batch_size}, {c.augment.image_size} px, {c.model.backbone})"
            for name, c in ((n, preset(n)) for n in PRESETS if n not in ("smoke", cfg.preset))
            if c.train.batch_size <= images]
    return (f"train.batch_size {cfg.train.batch_size} (preset {cfg.preset}) is larger than the data set "
            f"({images} images in {data}): pass a smaller --batch-size"
            + (f", or {' or '.join(fits)}" if fits else ""))


def run_header(cfg: Config, dist: DistInfo, device: torch.device, train_src, val_src, data: str) -> str:
    """The first line of a run's log: what runs, where, on what."""
    t = cfg.train
    classes = getattr(train_src, "classes", None)
    held = f"; kNN on {len(val_src)} images" if val_src is not None and t.knn_every else ""
    return (f"train: preset {cfg.preset}, device {device}, world size {dist.world_size}, precision "
            f"{t.precision}, {'DeepSpeed' if cfg.dist.deepspeed or dist.world_size > 1 else 'local'} "
            f"engine; data {data} ({len(train_src)} images"
            f"{f', {len(classes)} classes' if classes and classes != ['.'] else ''}{held}); {cfg.model.backbone} "
            f"at {cfg.augment.image_size} px, global batch {t.batch_size}, {t.epochs} epochs"
            f"{f' (stop at step {t.max_steps})' if t.max_steps else ''}; out {t.out}")


def local_engine(model: BYOL, cfg: Config, device: torch.device, dist: DistInfo) -> LocalEngine:
    """The default engine: one process, the configured optimizer at the scaled peak lr."""
    opt = build_optimizer(model.online, cfg.optim, scaled_lr(cfg.optim.base_lr, cfg.train.batch_size),
                          cfg.train.kernels)
    return LocalEngine(model.online, opt, device, cfg.train.precision, cfg.dist.grad_accum, cfg.train.compile)


def build_parts(cfg: Config, dist: Optional[DistInfo] = None, *,
                sources: Optional[Tuple[Any, Any]] = None,
                loader_factory: Optional[Callable[[Any, int, torch.device, DistInfo], TwoViewLoader]] = None,
                model_factory: Optional[Callable[[torch.device], BYOL]] = None,
                engine_factory: Optional[EngineFactory] = None,
                data_description: Optional[str] = None, rerunnable: bool = True) -> TrainerParts:
    """Start a run and build its parts; each argument replaces one default.

    Args:
        sources: ``(training source, kNN source)``; default :func:`~fastbyol.data.resolve_sources`.
        loader_factory: ``(training source, micro_batch, device, dist) -> loader``; default
            :func:`~fastbyol.data.build_train_loader` (``--data.loader``).
        model_factory: ``(device) -> BYOL`` on ``device``; default :func:`build_model`.
        engine_factory: ``(model, cfg, device, dist) -> engine``; default :func:`local_engine`
            (DeepSpeed: :func:`fastbyol.launch.deepspeed_engine_factory`).
        data_description: how the log and errors name the data; default ``--data`` (or the embedded set).
        rerunnable: whether ``config.yaml`` alone reruns this run (False for a user's network and Dataset).
    """
    cfg.validate()
    dist = dist or DistInfo()
    micro_batch = micro_batch_size(cfg, dist.world_size)
    if dist.is_main:
        check_writable(cfg.train.out)
    device = resolve_device(cfg.train.device, dist)
    seed_everything(cfg.train.seed)
    train_src, val_src = sources if sources is not None else resolve_sources(cfg)
    data = data_description or cfg.data.data or "the embedded synthetic set"
    if dist.is_main:
        log.info(run_header(cfg, dist, device, train_src, val_src, data))
    if len(train_src) < cfg.train.batch_size:  # before the loader, which would say it without the preset
        raise FastByolError(batch_too_large(cfg, len(train_src), data))
    if loader_factory is None:
        loader = build_train_loader(cfg, train_src, device, micro_batch, dist.rank, dist.world_size)
    else:
        loader = loader_factory(train_src, micro_batch, device, dist)
    model = model_factory(device) if model_factory is not None else build_model(cfg, device)
    engine = (engine_factory or local_engine)(model, cfg, device, dist)
    if cfg.train.compile:
        model.compile_target()  # the engine compiles the online network
    return TrainerParts(dist, device, train_src, val_src, loader, model, engine, data, rerunnable)
