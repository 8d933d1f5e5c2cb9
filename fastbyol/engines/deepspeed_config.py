"""The DeepSpeed config of a run: generated from fastbyol's config, or a user's JSON checked
against it and completed (why each refusal: :mod:`fastbyol.engines.deepspeed_engine`)."""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict

from ..config import Config
from ..errors import FastByolError
from ..runtime import micro_batch_size

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
                "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32"}


def batch_numbers(cfg: Config, world: int) -> Dict[str, int]:
    """DeepSpeed's three batch fields from fastbyol's global batch, accumulation and world size."""
    return {"train_batch_size": cfg.train.batch_size, "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world),
            "gradient_accumulation_steps": cfg.dist.grad_accum}


def _finish(ds: Dict[str, Any], cfg: Config, source: str) -> Dict[str, Any]:
    """Checks and defaults shared by generated and user configs."""
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.setdefault("stage", cfg.dist.zero_stage))
    if stage > 2:
        raise FastByolError(f"{source}: ZeRO stage {stage} partitions the weights, but the target EMA needs the "
                            "whole online network on every rank; use stage 0, 1 or 2")
    if stage > 0 and cfg.optim.optimizer == "lars":
        raise FastByolError(f"{source}: ZeRO stage {stage} hands the optimizer flat partitions, so LARS's per-layer "
                            "trust ratios would become per-partition; use --dist.zero_stage 0 with LARS, or "
                            "--optim.optimizer sgd|adamw with ZeRO")
    if stage > 0 and cfg.train.precision == "fp16":
        raise FastByolError(f"{source}: fp16 loss scaling is supported without ZeRO only; use "
                            "--train.precision bf16 with ZeRO, or --dist.zero_stage 0")
    if cfg.train.precision != "fp32":
        autocast = ds.setdefault("torch_autocast", {"enabled": True, "dtype": AUTOCAST_DTYPES[cfg.train.precision]})
        _reduce_dtype(ds, autocast, cfg, stage, source)
    if stage > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)  # a client optimizer, checked above
    ds.setdefault("gradient_clipping", 0.0)
    # DeepSpeed's throughput timer is on by default and synchronises the device at the start
    # and end of every micro-batch (3 syncs each); fastbyol times its steps itself.
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    ds.setdefault("flops_profiler", {"enabled": False})
    return ds


def _reduce_dtype(ds: Dict[str, Any], autocast: Dict[str, Any], cfg: Config, stage: int, source: str) -> None:
    """Gradients all-reduced in fp32 unless ``dist.reduce_dtype`` is bf16.

    Without ``lower_precision_safe_modules`` DeepSpeed's torch_autocast tags every Linear and
    Conv parameter with ``comm_dtype`` = the autocast dtype, and ZeRO 1-2 then reduce those
    gradients in bf16: LARS trust ratios would come from bf16-rounded averages, unlike a local
    run (fp32 gradients). An empty list tags nothing. ZeRO 0 ignores the tags and reduces in
    ``communication_data_type`` (fp32 unless DeepSpeed's own bf16 mode is on), so bf16 there
    is asked for through that key.
    """
    safe = autocast.get("lower_precision_safe_modules")
    if cfg.dist.reduce_dtype == "fp32":
        if safe:
            raise FastByolError(f"{source}: torch_autocast.lower_precision_safe_modules reduces those modules' "
                                "gradients in bf16; remove it, or pass --dist.reduce_dtype bf16")
        autocast["lower_precision_safe_modules"] = []
        comm = str(ds.get("communication_data_type", "fp32")).lower()
        if comm != "fp32":
            raise FastByolError(f"{source}: communication_data_type {comm!r} disagrees with --dist.reduce_dtype fp32")
    elif stage == 0:
        ds.setdefault("communication_data_type", "bf16")
    # else ZeRO 1-2 with reduce_dtype bf16: DeepSpeed's default tags (Linear, Conv*) or the user's list


def generated_config(cfg: Config, world: int) -> Dict[str, Any]:
    """The DeepSpeed config fastbyol writes when no ``--dist.ds_config`` is given."""
    ds = {**batch_numbers(cfg, world), "gradient_clipping": 0.0, "zero_optimization": {"stage": cfg.dist.zero_stage}}
    return _finish(ds, cfg, "dist.zero_stage")


def merge_user_config(user: Dict[str, Any], cfg: Config, world: int, source: str = "--dist.ds_config") -> Dict[str, Any]:
    """A user's DeepSpeed JSON, checked against fastbyol's config and completed.

    Batch fields may be absent or ``"auto"`` (filled in) but must otherwise agree with
    ``train.batch_size``, ``dist.grad_accum`` and the world size; precision comes from
    ``train.precision``; ``optimizer``/``scheduler`` sections and DeepSpeed's ``fp16``/``bf16``
    modes are refused (see the module docstring). Raises :class:`FastByolError` naming the key.
    """
    ds = copy.deepcopy(user)
    want = batch_numbers(cfg, world)
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif not isinstance(have, int) or have != value:
            raise FastByolError(
                f"{source}: {key} is {have!r} but fastbyol's config gives {value} (global batch "
                f"{want['train_batch_size']} = micro-batch {want['train_micro_batch_size_per_gpu']} x grad-accum "
                f"{want['gradient_accumulation_steps']} x {world} ranks); make them agree via --train.batch_size / "
                f"--dist.grad_accum, or drop the key and fastbyol fills it in")
    for key, why in (("optimizer", "fastbyol passes its own optimizer (--optim.optimizer)"),
                     ("scheduler", "fastbyol sets the learning rate every step (warm-up + cosine)")):
        if key in ds:
            raise FastByolError(f"{source}: remove the {key!r} section: {why}")
    for key in ("fp16", "bf16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled", False):
            raise FastByolError(
                f"{source}: remove the {key!r} section and use --train.precision {key}: DeepSpeed's {key} mode "
                "flattens parameter groups (LARS trust ratios would become per-partition); fastbyol runs "
                "torch autocast over fp32 weights instead")
    autocast = ds.get("torch_autocast")
    if isinstance(autocast, dict) and autocast.get("enabled", False):
        dtype = _DTYPE_NAMES.get(str(autocast.get("dtype", "bfloat16")).lower(), autocast.get("dtype"))
        if dtype != cfg.train.precision:
            raise FastByolError(f"{source}: torch_autocast dtype {autocast.get('dtype')!r} disagrees with "
                                f"--train.precision {cfg.train.precision}")
    elif isinstance(autocast, dict) and cfg.train.precision != "fp32":
        raise FastByolError(f"{source}: torch_autocast is disabled but --train.precision is {cfg.train.precision}")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage is not None and cfg.dist.zero_stage not in (0, stage):
        raise FastByolError(f"{source}: zero_optimization.stage {stage} disagrees with --dist.zero_stage "
                            f"{cfg.dist.zero_stage}")
    return _finish(ds, cfg, source)


def deepspeed_config(cfg: Config, world: int) -> Dict[str, Any]:
    """The DeepSpeed config of this run: ``cfg.dist.ds_config`` checked and completed, or generated."""
    path = cfg.dist.ds_config
    if path is None:
        return generated_config(cfg, world)
    try:
        with open(path) as fh:
            user = json.load(fh)
    except OSError as e:
        raise FastByolError(f"cannot read --dist.ds_config {path!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise FastByolError(f"--dist.ds_config {path!r} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise FastByolError(f"--dist.ds_config {path!r}: expected a JSON object")
    return merge_user_config(user, cfg, world, source=f"--dist.ds_config {os.path.basename(path)}")
