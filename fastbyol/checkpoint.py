"""Atomic checkpoints, exact resume, and export of the online encoder.

A checkpoint is written to ``<name>.tmp``, fsynced, renamed over the old one, and the folder is
fsynced, so neither a crash mid-write nor a power loss destroys the last good checkpoint.
With ``train.keep_last N`` the newest N checkpoints are also kept as
``checkpoint-<step>.pt`` (``checkpoint.pt`` is a hard link to the newest).

Every checkpoint holds tensors and plain Python types only (RNG states included, numpy's as its
components), so it loads with ``torch.load(weights_only=True)``, which is how fastbyol reads
it: opening a checkpoint someone sent cannot run code.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .errors import FastByolError

CHECKPOINT_NAME = "checkpoint.pt"
NUMBERED = re.compile(r"^checkpoint-(\d+)\.pt$")
SLOW_SAVE_ENV = "FASTBYOL_TEST_SLOW_SAVE"  # tests: seconds to pause half-way through a write


def numbered_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (power loss, not just a killed process)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write(obj: Any, fh) -> None:
    pause = float(os.environ.get(SLOW_SAVE_ENV, 0) or 0)
    if not pause:
        torch.save(obj, fh)
        return
    # Test hook: write half the bytes, say so, wait (a test kills the process here), finish.
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    fh.write(data[: len(data) // 2])
    fh.flush()
    print(f"fastbyol-test: mid-write {fh.name}", file=sys.stderr, flush=True)
    time.sleep(pause)
    fh.write(data[len(data) // 2:])


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, rename, fsync the folder."""
    _atomic(path, lambda fh: _write(obj, fh))


def atomic_write_text(text: str, path: str) -> None:
    """``text`` (a run's config, an export's record) written as :func:`atomic_save` writes."""
    _atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def _publish(src: str, dst: str) -> None:
    """Atomically make ``dst`` the same file as ``src`` (a hard link; a copy where links fail)."""
    tmp = f"{dst}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def numbered_steps(folder: str) -> List[int]:
    """Steps of the ``checkpoint-<step>.pt`` files in ``folder``, ascending."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for m in map(NUMBERED.match, os.listdir(folder)) if m)


def write_checkpoint(state: Dict[str, Any], path: str, keep_last: int = 0) -> List[int]:
    """Write ``state`` as ``path`` (``.../checkpoint.pt``), atomically. With ``keep_last`` N > 0 it
    is first written as ``checkpoint-<step>.pt``, then linked as ``checkpoint.pt``, and numbered
    files of earlier steps beyond the newest N are removed (later ones, left by a run resumed from
    an older checkpoint, are kept). Returns the steps whose checkpoints now exist."""
    step = int(state["step"])
    if keep_last <= 0:
        atomic_save(state, path)
        return [step]
    folder = os.path.dirname(os.path.abspath(path))
    numbered = os.path.join(folder, numbered_name(step))
    atomic_save(state, numbered)
    _publish(numbered, path)
    steps = numbered_steps(folder)
    older = [s for s in steps if s < step]
    removed = older[: max(0, len(older) - (keep_last - 1))]
    for s in removed:
        os.remove(os.path.join(folder, numbered_name(s)))
    return [s for s in steps if s not in removed]


def has_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CHECKPOINT_NAME))


# ----------------------------------------------------------------------------- RNG

def rng_state() -> Dict[str, Any]:
    """Every generator's state as tensors and plain types (loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),  # (version, tuple of 625 ints, float or None)
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- reading

def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run folder holding ``checkpoint.pt``."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FastByolError(f"no checkpoint at {path!r}")
    return path


def safe_load(path: str, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # no Python object refused: a damaged or foreign file, not a pickle of code
            raise FastByolError(f"cannot read {what} {path!r}: not a PyTorch checkpoint "
                                f"({type(e).__name__})") from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise FastByolError(
            f"{what} {path!r} holds pickled Python objects that a safe load refuses ({first[:120]}): it was "
            "written by an older fastbyol or another program; fastbyol never unpickles code, so re-save it "
            "from a process you trust or start a new run") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FastByolError(f"cannot read {what} {path!r}: {first}") from None


def load_checkpoint(path: str) -> Dict[str, Any]:
    path = resolve_checkpoint(path)
    state = safe_load(path)
    if not isinstance(state, dict):
        raise FastByolError(f"{path!r} is not a fastbyol checkpoint (it holds a {type(state).__name__})")
    return state


# ----------------------------------------------------------------------------- export

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


def export_record_path(path: str) -> str:
    """Where the training record of an exported encoder lives: ``<encoder file>.json``."""
    return f"{path}.json"


def export_record(ckpt: Dict[str, Any], source: str) -> Optional[Dict[str, Any]]:
    """What evaluating an exported encoder needs from its training (``None`` for a checkpoint
    without a config): the size and normalisation of its inputs, its preset and architecture, the
    training monitor's kNN settings, and the whole config (data, seed) to evaluate it as its
    checkpoint would be."""
    if not isinstance(ckpt.get("config"), dict):
        return None
    from .config import config_from_dict

    cfg = config_from_dict(ckpt["config"])
    return {"format": "fastbyol encoder export 1", "preset": cfg.preset, "backbone": cfg.model.backbone,
            "cifar_stem": cfg.model.cifar_stem, "image_size": cfg.augment.image_size,
            "mean": list(cfg.augment.mean), "std": list(cfg.augment.std), "knn_k": cfg.train.knn_k,
            "knn_t": cfg.train.knn_t, "step": int(ckpt.get("step", 0)), "checkpoint": os.path.abspath(source),
            "config": cfg.to_dict()}


def read_export_record(path: str) -> Optional[Dict[str, Any]]:
    """The training record beside an exported encoder (:func:`export_record_path`), or None."""
    import json

    record = export_record_path(path)
    if not os.path.isfile(record):
        return None
    try:
        with open(record) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise FastByolError(f"cannot read {record!r}, the training record of {path!r}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise FastByolError(f"{record!r} is not a fastbyol export record (no training config in it)")
    return meta


def export_encoder(ckpt_path: str, out_path: str) -> Dict[str, torch.Tensor]:
    """Write the online encoder as a plain state_dict: for a ResNet,
    ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` misses only ``fc.*``;
    a convnet4 loads strictly. The training record (image size, normalisation, preset,
    architecture, kNN k; :func:`export_record`) goes beside it as ``<out_path>.json``, so the
    ``.pt`` stays a state_dict of tensors only; ``fastbyol eval`` reads both. Refuses an encoder
    holding NaN or inf."""
    import json

    from .finite import first_nonfinite_in

    ckpt = load_checkpoint(ckpt_path)
    sd = encoder_state_dict(ckpt)
    bad = first_nonfinite_in(sd.items())
    if bad:
        raise FastByolError(f"refusing to export a non-finite encoder from {ckpt_path!r}: {bad}")
    record = export_record(ckpt, resolve_checkpoint(ckpt_path))
    atomic_save(sd, out_path)
    meta_path = export_record_path(out_path)
    if record is None:
        if os.path.exists(meta_path):  # a record of an earlier export would describe the wrong encoder
            os.remove(meta_path)
        return sd
    atomic_write_text(json.dumps(record, indent=2), meta_path)
    return sd
