"""Whether a run starts fresh or resumes, and whether a resume may use the new settings.

* ``--resume auto`` resumes when ``--out`` holds a checkpoint and starts fresh otherwise, so a
  preemptible job can use one fixed command line.
* A fresh run into a folder holding a checkpoint is refused: forgetting ``--resume`` must not
  overwrite days of progress.
* A resume compares the checkpoint's config with the new one. Settings that change what is
  computed (schedules, seed, batch, model, augmentation, optimizer, data, precision) refuse,
  listing every difference, unless ``--train.resume_override`` names them (or is ``true``);
  settings that change only how the run is reported, stored or executed (:data:`HARMLESS`)
  may change freely.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from .checkpoint import CHECKPOINT_NAME, has_checkpoint
from .errors import FastByolError

# Fields a resume may change: reporting, storage, stopping point, and how the same maths is
# executed (world size and accumulation at the same global batch, kernels, compile, layout).
HARMLESS = frozenset({
    "preset", "train.out", "train.resume", "train.resume_override", "train.max_steps", "train.log_every",
    "train.ckpt_every", "train.ckpt_every_steps", "train.ckpt_every_minutes", "train.keep_last",
    "train.stop_check_every", "train.knn_every", "train.knn_k", "train.knn_t", "train.knn_max_train", "train.knn_max_query",
    "train.knn_at_start",
    "train.kernels", "train.compile", "train.channels_last", "train.device", "data.workers", "data.cache_dir",
    "data.val_data", "dist.deepspeed", "dist.ds_config", "dist.zero_stage", "dist.grad_accum",
    "dist.timeout_minutes",
})


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return flat


def config_differences(saved: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(field, saved value, new value)`` for every result-changing field that differs. A field
    the checkpoint does not have (added to fastbyol after it was written) reads as its default:
    new fields default to what fastbyol did before they existed."""
    from .config import Config

    a, b = {**flatten(Config().to_dict()), **flatten(saved)}, flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in HARMLESS and a.get(k) != b.get(k)]


def check_resume_config(saved: Optional[Dict[str, Any]], new: Dict[str, Any], override: Optional[str],
                        path: str) -> List[Tuple[str, Any, Any]]:
    """Raise :class:`FastByolError` listing the differences not covered by ``override``; returns
    the overridden ones (the trainer logs them)."""
    if not isinstance(saved, dict):
        raise FastByolError(f"cannot resume {path!r}: it holds no config (was it written by fastbyol?)")
    diffs = config_differences(saved, new)
    text = (override or "").strip().lower()
    if text in ("true", "all", "yes", "1"):
        return diffs
    allowed = {f.strip() for f in (override or "").split(",") if f.strip()}
    refused = [d for d in diffs if d[0] not in allowed]
    if refused:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in refused)
        names = ",".join(k for k, _, _ in refused)
        raise FastByolError(
            f"cannot resume {path!r} with other settings that change the result: {listed}; "
            f"undo them, or pass --train.resume_override {names} (or true) to resume anyway")
    return diffs


def resolve_resume(resume: Optional[str], out: str) -> Optional[str]:
    """The checkpoint to resume from (None: start fresh), applying ``auto`` and refusing a fresh
    run, or a resume from elsewhere, that would overwrite the checkpoint in ``out``."""
    if resume == "auto":
        return out if has_checkpoint(out) else None
    if has_checkpoint(out):
        target = os.path.join(out, CHECKPOINT_NAME)
        if resume is None:
            raise FastByolError(f"--out {out!r} already holds a checkpoint ({target}); pass --resume auto to "
                                "continue that run, or a new --out to start another")
        src = os.path.join(resume, CHECKPOINT_NAME) if os.path.isdir(resume) else resume
        if os.path.dirname(os.path.abspath(src)) != os.path.abspath(out):
            raise FastByolError(f"--out {out!r} already holds a checkpoint of another run ({target}); resuming "
                                f"{resume!r} would overwrite it: pass a new --out")
    return resume
