"""Data: sources (folders, CIFAR, the embedded default), and the two loader paths."""
from __future__ import annotations

import logging
from typing import Tuple

import torch

from ..config import Config
from ..errors import FastByolError
from .base import TwoViewBatch, TwoViewLoader
from .image_source import ImageSource
from .sources import load_source, split_holdout

log = logging.getLogger("fastbyol.data")

__all__ = ["TwoViewBatch", "TwoViewLoader", "ImageSource", "resolve_sources", "build_train_loader", "dali_available"]


def resolve_sources(cfg: Config) -> Tuple[ImageSource, ImageSource]:
    """(training source, labelled kNN source) for a config.

    No ``--data``: the embedded texture set (written once to the cache). ``--val-data``:
    that set's test split / folder; otherwise a stratified share of ``--data`` is held out.
    """
    d = cfg.data
    if d.data is None:
        from .synthetic import ensure_default_dataset

        paths = ensure_default_dataset(d.cache_dir)
        return load_source(paths["train"]), load_source(paths["val"])
    train = load_source(d.data, train=True)
    if d.val_data is not None:
        return train, load_source(d.val_data, train=False)
    if train.array is not None:  # CIFAR: its own test batch is the natural hold-out
        try:
            return train, load_source(d.data, train=False)
        except FastByolError:
            pass
    return split_holdout(train, d.val_fraction, cfg.train.seed)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def choose_loader(requested: str, device: torch.device) -> str:
    """``auto`` → DALI when it is installed and training runs on CUDA, else torch."""
    if requested == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torch"
    return requested


def view_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The views' dtype: on CUDA the training precision (half the bytes; DALI writes float16
    itself, bfloat16 is one cast), so the first convolution does not cast them again under
    autocast; float32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def build_train_loader(cfg: Config, source: ImageSource, device: torch.device, micro_batch: int,
                       rank: int = 0, world_size: int = 1) -> TwoViewLoader:
    """The training loader named by ``cfg.data.loader`` (``auto|torch|dali``)."""
    kind = choose_loader(cfg.data.loader, device)
    from ..backbones import memory_format

    kwargs = dict(seed=cfg.train.seed, rank=rank, world_size=world_size, workers=cfg.data.workers,
                  channels_last=memory_format(cfg, device) == torch.channels_last,
                  out_dtype=view_dtype(cfg.train.precision, device))
    if kind == "dali":
        from .dali import DaliTwoViewLoader

        return DaliTwoViewLoader(source, cfg.augment, micro_batch, device, **kwargs)
    from .torch_loader import TorchTwoViewLoader

    return TorchTwoViewLoader(source, cfg.augment, micro_batch, device, kernels=cfg.train.kernels, **kwargs)
