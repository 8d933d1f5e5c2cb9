"""Typed configuration: dataclasses, named presets, command-line overrides, validation.

Every field of :class:`Config` can be set from the command line as
``--section.field VALUE`` (e.g. ``--optim.base_lr 0.3``); the common ones also have
short aliases (``--data``, ``--epochs``, ...). Values are validated once, early, with a
message that names the bad field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Tuple, get_args, get_origin, get_type_hints

from .errors import FastByolError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | convnet4
    cifar_stem: bool = False  # 3x3 stride-1 first conv, no max-pool (32 px inputs)
    projector_hidden: int = 4096  # projector g: Linear(d, hidden) -> BN -> ReLU -> Linear(hidden, dim)
    projection_dim: int = 256  # output size of projector and predictor
    predictor_hidden: int = 4096  # predictor q: Linear(dim, hidden) -> BN -> ReLU -> Linear(hidden, dim)
    use_momentum: bool = True  # False: SimSiam-style target (online net + stop-gradient)
    bn_buffers: str = "own"  # target BN running stats: own (reference) | ema | copy


@dataclass
class ViewConfig:
    """Probabilities and strengths of one BYOL view (BYOL_SPEC augmentation table)."""

    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # colour jitter probability (the four ops in random order)
    brightness: float = 0.4  # brightness factor drawn from [1-b, 1+b]
    contrast: float = 0.4  # contrast factor drawn from [1-c, 1+c]
    saturation: float = 0.2  # saturation factor drawn from [1-s, 1+s]
    hue: float = 0.1  # hue shift drawn from [-h, h] (fraction of a turn)
    grayscale_p: float = 0.2  # grayscale probability
    blur_p: float = 1.0  # Gaussian blur probability (view 1: 1.0, view 2: 0.1)
    solarize_p: float = 0.0  # solarisation probability (view 1: 0, view 2: 0.2)


@dataclass
class AugmentConfig:
    """Shared by the torch path (fastbyol.augment) and the DALI path (fastbyol.data.dali)."""

    image_size: int = 224  # side of both views after the random resized crop
    crop_scale: Tuple[float, float] = (0.08, 1.0)  # crop area as a share of the image
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range (log-uniform)
    blur_sigma: Tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma range, in pixels
    blur_kernel_frac: float = 0.1  # kernel side ~10% of the image side (23 px at 224)
    mean: Tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation mean
    std: Tuple[float, float, float] = IMAGENET_STD  # per-channel normalisation std
    view1: ViewConfig = field(default_factory=lambda: ViewConfig(blur_p=1.0, solarize_p=0.0))
    view2: ViewConfig = field(default_factory=lambda: ViewConfig(blur_p=0.1, solarize_p=0.2))

    @property
    def blur_kernel_size(self) -> int:
        k = max(3, int(round(self.image_size * self.blur_kernel_frac)))
        return k if k % 2 == 1 else k + 1

    def views(self) -> Tuple[ViewConfig, ViewConfig]:
        return self.view1, self.view2


@dataclass
class DataConfig:
    data: Optional[str] = None  # class folders, CIFAR batches dir, or webdataset .tar shards; None: embedded default
    val_data: Optional[str] = None  # labelled held-out set for kNN; None: carved from --data
    val_fraction: float = 0.1  # share of --data held out for kNN when --val-data is absent
    loader: str = "auto"  # auto | torch | dali
    workers: int = 2  # DataLoader workers (torch) or DALI CPU threads
    cache_dir: Optional[str] = None  # where the embedded default data set is written once


@dataclass
class OptimConfig:
    optimizer: str = "lars"  # lars | sgd | adamw
    base_lr: float = 0.2  # lr = base_lr * global_batch / 256
    weight_decay: float = 1.5e-6  # not applied to biases and BN parameters
    momentum: float = 0.9  # LARS / SGD momentum
    trust_coefficient: float = 1e-3  # LARS eta
    warmup_epochs: float = 10.0  # linear lr warm-up from 0, then cosine decay
    tau_base: float = 0.996  # EMA momentum at step 0, cosine-increased to 1
    betas: Tuple[float, float] = (0.9, 0.999)  # adamw only


@dataclass
class TrainConfig:
    batch_size: int = 4096  # global batch (micro-batch x grad-accum x world size)
    epochs: int = 1000  # length of the lr and tau schedules
    max_steps: Optional[int] = None  # stop early after this many optimizer steps
    precision: str = "bf16"  # bf16 | fp16 | fp32
    seed: int = 0  # all randomness (weights, data order, augmentations) follows from it
    out: str = "runs/fastbyol"  # run folder: checkpoint.pt, metrics.jsonl, curves.png
    resume: Optional[str] = None  # checkpoint file or run directory; auto: resume if --out holds a checkpoint, else start fresh
    resume_override: Optional[str] = None  # resume despite changed result-changing settings: comma-separated fields, or true for all
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10  # steps between progress lines / JSONL records
    ckpt_every: int = 1  # epochs between checkpoints (0: final only)
    ckpt_every_steps: int = 0  # also every this many optimizer steps (0: off)
    ckpt_every_minutes: float = 30.0  # also every this many minutes of training (0: off)
    keep_last: int = 2  # numbered checkpoint-<step>.pt files kept besides checkpoint.pt (0: checkpoint.pt only)
    stop_check_every: int = 5  # multi-rank: steps between the ranks' agreement on a signal / timed checkpoint
    knn_every: int = 10  # epochs between kNN evaluations (0: never)
    knn_k: int = 200  # kNN monitor neighbours
    knn_t: float = 0.1  # kNN monitor temperature
    knn_max_train: int = 50000  # cap on the kNN feature bank
    knn_max_query: int = 10000  # cap on the kNN query set (a seeded random subset, the same at every evaluation)
    knn_at_start: bool = False  # also a kNN of the random-init encoder before step 1 (the baseline line); on in the small presets, off for ImageNet (minutes before the first step)
    kernels: str = "auto"  # backend for the fused kernels (loss, EMA, LARS, on-device augmentation): auto | triton | torch
    compile: bool = False  # torch.compile the online/target networks
    channels_last: str = "auto"  # auto | on | off; auto: on for CUDA, on CPU only when the first feature map is >= 32 px


@dataclass
class DistConfig:
    deepspeed: bool = False  # run under DeepSpeed (also implied by a deepspeed launcher)
    ds_config: Optional[str] = None  # user DeepSpeed JSON; None: generated from this config
    zero_stage: int = 0  # DeepSpeed ZeRO stage (1-2 refused with LARS)
    grad_accum: int = 1  # micro-batches per optimizer step
    sync_bn: bool = True  # SyncBatchNorm when world size > 1 (as the paper)
    reduce_dtype: str = "fp32"  # DeepSpeed gradient all-reduce: fp32 (as a local run) | bf16 (half the bytes, bf16-rounded gradients into LARS)
    timeout_minutes: float = 30.0  # process-group timeout for every collective (torch's NCCL default: 10)


@dataclass
class Config:
    preset: str = "imagenet-resnet50"  # the named preset this config started from
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        validate(self)
        return self


# ----------------------------------------------------------------------------- presets

def _cifar_augment(size: int = 32) -> AugmentConfig:
    # CIFAR presets drop blur (common practice; BYOL_SPEC).
    return AugmentConfig(
        image_size=size,
        view1=ViewConfig(blur_p=0.0, solarize_p=0.0),
        view2=ViewConfig(blur_p=0.0, solarize_p=0.2),
    )


def _imagenet_resnet50() -> Config:
    # The paper's 1000-epoch setting: LARS, lr 0.2 x bs/256, wd 1.5e-6, 10 warm-up epochs,
    # tau_base 0.996, global batch 4096.
    return Config(preset="imagenet-resnet50")


def _cifar10_resnet18() -> Config:
    # solo-learn's CIFAR recipe: LARS lr 1.0 x bs/256, batch 256, 1000 epochs.
    return Config(
        preset="cifar10-resnet18",
        model=ModelConfig(backbone="resnet18", cifar_stem=True),
        augment=_cifar_augment(32),
        optim=OptimConfig(base_lr=1.0, weight_decay=1e-5, tau_base=0.99, warmup_epochs=10),
        train=TrainConfig(batch_size=256, epochs=1000, knn_every=10, knn_at_start=True),
    )


def _default() -> Config:
    # What `fastbyol train` runs with no data argument: the embedded synthetic set on a
    # 2-core CPU in about two minutes. A 4-layer convnet (a ResNet-18 trains at ~15 img/s
    # there); tau_base 0.9 because 0.99 learns nothing in a few hundred steps; lr 0.025
    # (base 0.1) because 0.1 learned on only some seeds (benchmarks/results/LOG.md).
    return Config(
        preset="default",
        model=ModelConfig(backbone="convnet4", projector_hidden=512, predictor_hidden=512, projection_dim=128),
        augment=_cifar_augment(32),
        optim=OptimConfig(optimizer="sgd", base_lr=0.1, weight_decay=1e-4, warmup_epochs=1, tau_base=0.9),
        train=TrainConfig(batch_size=64, epochs=30, precision="fp32", knn_every=5, knn_k=20, ckpt_every=5,
                          log_every=10, out="runs/default", knn_at_start=True),
    )


def _smoke() -> Config:
    # Seconds on a CPU: the tests and CI use it.
    return Config(
        preset="smoke",
        model=ModelConfig(backbone="convnet4", projector_hidden=64, predictor_hidden=64, projection_dim=32),
        augment=_cifar_augment(16),
        optim=OptimConfig(optimizer="lars", base_lr=0.2, warmup_epochs=1, tau_base=0.99),
        train=TrainConfig(batch_size=16, epochs=2, precision="fp32", knn_every=1, knn_k=10, log_every=1,
                          out="runs/smoke", knn_at_start=True),
        data=DataConfig(workers=0),
    )


PRESETS = {
    "default": _default,
    "smoke": _smoke,
    "cifar10-resnet18": _cifar10_resnet18,
    "imagenet-resnet50": _imagenet_resnet50,
}


def preset(name: str) -> Config:
    """A fresh :class:`Config` for a named preset."""
    if name not in PRESETS:
        raise FastByolError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- overrides

def iter_fields(obj: Any, prefix: str = ""):
    """Yield (dotted_name, type, value) for every leaf field of a config dataclass."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, name + ".")
        else:
            yield name, hints[f.name], value


def parse_value(text: str, typ: Any, name: str) -> Any:
    """Parse a command-line string into a field's declared type."""
    origin = get_origin(typ)
    if origin is Optional or (origin is not None and type(None) in get_args(typ)):
        if text.lower() in ("none", "null", ""):
            return None
        inner = [a for a in get_args(typ) if a is not type(None)][0]
        return parse_value(text, inner, name)
    if origin in (tuple, Tuple):
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        args = get_args(typ)
        if len(parts) != len(args):
            raise FastByolError(f"config field {name}: expected {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(p.strip(), a, name) for p, a in zip(parts, args))
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        if typ is float:
            return float(text)
        return str(text)
    except ValueError:
        raise FastByolError(f"config field {name}: cannot parse {text!r} as {getattr(typ, '__name__', typ)}") from None


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``cfg.<dotted>`` (e.g. ``optim.base_lr``); unknown names raise FastByolError."""
    obj = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise FastByolError(f"unknown config field {dotted!r}")
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in fields(obj)}:
        raise FastByolError(f"unknown config field {dotted!r}")
    setattr(obj, parts[-1], value)


def field_docs() -> dict:
    """``{"optim.base_lr": "lr = base_lr * global_batch / 256", ...}``: the trailing comment of
    each field's line in this file, so the CLI help and the source never disagree."""
    import inspect
    import re

    sections = {"model": ModelConfig, "augment": AugmentConfig, "data": DataConfig, "optim": OptimConfig,
                "train": TrainConfig, "dist": DistConfig, "augment.view1": ViewConfig, "augment.view2": ViewConfig}
    docs = {}
    for prefix, cls in sections.items():
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
            if m:
                docs[f"{prefix}.{m.group(1)}"] = m.group(2).strip()
    return docs


def field_types(cfg: Config) -> dict:
    return {name: typ for name, typ, _ in iter_fields(cfg)}


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """Apply ``{"optim.base_lr": "0.3", ...}`` (strings are parsed to the field's type)."""
    types = field_types(cfg)
    for name, raw in overrides.items():
        if name not in types:
            raise FastByolError(f"unknown config field {name!r}")
        value = parse_value(raw, types[name], name) if isinstance(raw, str) else raw
        set_field(cfg, name, value)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (checkpoints)."""
    cfg = Config()
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v

    walk("", d)
    preset_name = flat.pop("preset", "imagenet-resnet50")
    cfg.preset = preset_name
    return apply_overrides(cfg, flat)


# ----------------------------------------------------------------------------- validation

def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise FastByolError(f"config field {name}: {msg}")


def validate(cfg: Config) -> None:
    m, a, d, o, t, s = cfg.model, cfg.augment, cfg.data, cfg.optim, cfg.train, cfg.dist
    _check(m.backbone in BACKBONE_NAMES, "model.backbone",
           f"{m.backbone!r} is not one of {', '.join(BACKBONE_NAMES)}")
    for n in ("projector_hidden", "projection_dim", "predictor_hidden"):
        _check(getattr(m, n) > 0, f"model.{n}", "must be > 0")
    _check(m.bn_buffers in ("own", "ema", "copy"), "model.bn_buffers", "must be own, ema or copy")
    _check(a.image_size >= 8, "augment.image_size", "must be >= 8")
    _check(0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "augment.crop_scale", "needs 0 < min <= max <= 1")
    _check(0 < a.crop_ratio[0] <= a.crop_ratio[1], "augment.crop_ratio", "needs 0 < min <= max")
    _check(0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma", "needs 0 < min <= max")
    _check(all(s_ > 0 for s_ in a.std), "augment.std", "must be > 0")
    for vname, v in (("view1", a.view1), ("view2", a.view2)):
        for n in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            _check(0.0 <= getattr(v, n) <= 1.0, f"augment.{vname}.{n}", "is a probability in [0, 1]")
        for n in ("brightness", "contrast", "saturation"):
            _check(0.0 <= getattr(v, n) < 1.0, f"augment.{vname}.{n}", "must be in [0, 1)")
        _check(0.0 <= v.hue <= 0.5, f"augment.{vname}.hue", "must be in [0, 0.5]")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    _check(d.loader in ("auto", "torch", "dali"), "data.loader", "must be auto, torch or dali")
    _check(d.workers >= 0, "data.workers", "must be >= 0")
    _check(o.optimizer in ("lars", "sgd", "adamw"), "optim.optimizer", "must be lars, sgd or adamw")
    _check(o.base_lr > 0, "optim.base_lr", "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)")
    _check(o.trust_coefficient > 0, "optim.trust_coefficient", "must be > 0")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(0.0 <= o.tau_base <= 1.0, "optim.tau_base", "must be in [0, 1]")
    _check(t.batch_size >= 2, "train.batch_size", "must be >= 2 (BatchNorm needs more than one sample)")
    _check(t.epochs >= 1, "train.epochs", "must be >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1")
    _check(t.precision in ("bf16", "fp16", "fp32"), "train.precision", "must be bf16, fp16 or fp32")
    _check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
           "must be auto, cpu or cuda")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
    _check(t.ckpt_every_steps >= 0, "train.ckpt_every_steps", "must be >= 0")
    _check(t.ckpt_every_minutes >= 0, "train.ckpt_every_minutes", "must be >= 0")
    _check(t.keep_last >= 0, "train.keep_last", "must be >= 0")
    _check(t.stop_check_every >= 1, "train.stop_check_every", "must be >= 1")
    _check(t.knn_every >= 0, "train.knn_every", "must be >= 0")
    _check(t.knn_k >= 1, "train.knn_k", "must be >= 1")
    _check(t.knn_max_query >= 1, "train.knn_max_query", "must be >= 1")
    _check(t.knn_t > 0, "train.knn_t", "must be > 0")
    _check(t.kernels in ("auto", "triton", "torch"), "train.kernels", "must be auto, triton or torch")
    _check(t.channels_last in ("auto", "on", "off"), "train.channels_last", "must be auto, on or off")
    _check(s.zero_stage in (0, 1, 2), "dist.zero_stage", "must be 0, 1 or 2")
    _check(s.grad_accum >= 1, "dist.grad_accum", "must be >= 1")
    _check(s.reduce_dtype in ("fp32", "bf16"), "dist.reduce_dtype", "must be fp32 or bf16")
    _check(s.reduce_dtype == "fp32" or t.precision == "bf16", "dist.reduce_dtype",
           "bf16 needs --train.precision bf16")
    _check(s.timeout_minutes > 0, "dist.timeout_minutes", "must be > 0")


BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50", "convnet4")
