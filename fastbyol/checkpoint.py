"""Atomic checkpoints, exact resume, and export of the online encoder.

A checkpoint is written to ``<name>.tmp`` and renamed over the old one, so a crash
mid-write never destroys the last good checkpoint.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

from .errors import FastByolError

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run folder holding ``checkpoint.pt``."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FastByolError(f"no checkpoint at {path!r}")
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise FastByolError(f"cannot read checkpoint {path!r}: {e}") from None


def encoder_state_dict(ckpt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The online encoder's weights with the keys a bare backbone expects
    (``online.encoder.`` stripped; a wrapped user module's ``net.`` too)."""
    online = ckpt.get("online")
    if online is None:
        raise FastByolError("checkpoint holds no online network (was it written by fastbyol?)")
    prefix = "encoder."
    sd = {k[len(prefix):]: v for k, v in online.items() if k.startswith(prefix)}
    if sd and all(k.startswith("net.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items()}
    return sd


def export_encoder(ckpt_path: str, out_path: str) -> Dict[str, torch.Tensor]:
    """Write the online encoder as a plain state_dict: for a ResNet,
    ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` misses only ``fc.*``."""
    sd = encoder_state_dict(load_checkpoint(ckpt_path))
    atomic_save(sd, out_path)
    return sd
