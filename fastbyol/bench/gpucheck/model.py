"""Part h: the step cost model (``fastbyol cost``) next to what this device measured, stage by
stage, so the first GPU run calibrates the model's assumed efficiencies (docs/cost.md).

The part itself counts the step on meta tensors (the model) and times the on-device
augmentation alone, as the torch loader runs it; :func:`calibration` then joins those with the
stages other parts measured in the same run: the loss, EMA and LARS micro-benchmarks (part b)
and the whole compute step on pre-made views (part c's ``fastbyol-synthetic`` row).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Optional

import torch

from fastbyol.augment import augment_pair, draw_batch
from fastbyol.bench.common import time_fn
from fastbyol.bench.train.configs import bench_configs
from fastbyol.bench.train.fastbyol_runner import trainer_config
from fastbyol.cost import modelled_stage_ms
from fastbyol.data import view_dtype

from .settings import PartSkip


def _model_device(device: torch.device) -> str:
    """The roofline row to compare with: this GPU's, or H200's on a CPU (a rehearsal)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return "H100" if "H100" in name else "H200"


def part_model(pc) -> Dict:
    s = pc.settings
    name = s.configs["e2e-r50"]
    bench, batch = bench_configs()[name], s.batch[name]
    ctx = SimpleNamespace(cfg=bench, source=SimpleNamespace(root=None), workers=0, batch=batch,
                          precision=s.precision, kernels=s.kernels, seed=0, device=pc.device)
    cfg = trainer_config(ctx, "torch", pc.out)
    which = _model_device(pc.device)
    pc.log(f"[model] counting one step of {name} (batch {batch}, {cfg.train.precision}) on meta tensors")
    modelled = modelled_stage_ms(cfg, which)
    pc.log(f"[model] timing the on-device augmentation alone ({batch} x 2 views, {cfg.augment.image_size} px)")
    augmentation_ms = _augmentation_ms(cfg, batch, pc.device, repeats=3 if s.tiny else 20)
    return {"config": name, "batch": batch, "model_device": which, "modelled_ms": modelled,
            "measured_augmentation_ms": augmentation_ms,
            # Trainer.train_micro_batch calls the count made on meta tensors (a warm-up step, then the counted one)
            "meta_steps": 2 * cfg.dist.grad_accum}


def _augmentation_ms(cfg, batch: int, device: torch.device, repeats: int) -> float:
    """Median ms of :func:`~fastbyol.augment.augment_pair` on uint8 crops already on the device:
    what the torch loader's batches cost the training device (``train.kernels`` chooses the
    fused kernel or the torch ops, as in training)."""
    aug, size = cfg.augment, cfg.augment.image_size
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (batch, 2, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    draws = draw_batch(batch, size, size, aug, seed=0)
    out_dtype = view_dtype(cfg.train.precision, device)
    channels_last = device.type == "cuda"
    t = time_fn(lambda: augment_pair(crops, aug, draws, out_dtype, channels_last, cfg.train.kernels), device,
                repeats=repeats, warmup=2)
    return t["median_s"] * 1e3


def _micro_us(parts: Dict, benchmark: str, *methods: str) -> Optional[float]:
    rows = parts.get("micro", {}).get("rows", [])
    for method in methods:
        for r in rows:
            if r["benchmark"] == benchmark and r["method"].startswith(method) and r.get("dtype") in (None, "float32") \
                    and r.get("mode") in ("", "graph", "launched", None):
                return r["time_us"]
    return None


def calibration(parts: Dict) -> Dict:
    """Modelled against measured ms per stage, from part h and the other parts of this run."""
    h = parts.get("model", {})
    if h.get("status") != "ok":
        raise PartSkip("part h (the model) did not run")
    m = h["modelled_ms"]
    synthetic = next((r for r in parts.get("e2e-r50", {}).get("rows", [])
                      if r.get("mode") == "fastbyol-synthetic" and r.get("status") == "ok"), None)
    measured = {
        "augmentation": (h["measured_augmentation_ms"], "part h: augment_pair alone"),
        "loss": (_us_to_ms(_micro_us(parts, "loss@train-batch", "fastbyol")), "part b: loss at the training batch"),
        "ema": (_us_to_ms(_micro_us(parts, "ema", "fastbyol")), "part b: EMA (ResNet-50 + projector)"),
        "optimizer": (_us_to_ms(_micro_us(parts, "lars", "fastbyol LARS Triton", "fastbyol")),
                      "part b: LARS (ResNet-50 shapes)"),
        "compute step": (synthetic and 1e3 * synthetic["batch"] / synthetic["img_s"],
                         "part c: fastbyol-synthetic, the step on pre-made views"),
    }
    modelled = dict(m)
    modelled["compute step"] = m["step"] - m.get("augmentation", 0.0)
    rows = []
    for stage, (ms, source) in measured.items():
        model_ms = modelled.get(stage)
        rows.append({"stage": stage, f"modelled {h['model_device']} ms": model_ms, "measured ms": ms,
                     "measured / modelled": (ms / model_ms) if ms and model_ms else None, "measured by": source})
    for stage in ("forward", "backward", "batchnorm"):
        rows.append({"stage": stage, f"modelled {h['model_device']} ms": modelled.get(stage), "measured ms": None,
                     "measured / modelled": None, "measured by": "inside the compute step (not timed apart)"})
    return {"rows": rows, "notes": ["the modelled times are fastbyol cost's roofline (docs/cost.md); a measured / "
                                    "modelled ratio far from 1 says which assumed efficiency to change"]}


def _us_to_ms(us: Optional[float]) -> Optional[float]:
    return None if us is None else us / 1e3


__all__ = ["calibration", "part_model"]
