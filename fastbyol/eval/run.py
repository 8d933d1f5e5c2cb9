"""``fastbyol eval linear|knn``: the encoder, the data, the process group, progress lines, a
JSON result file and (linear) a PNG of the probe's curve.

Data: ``--data``/``--val-data`` as in training (class folders, CIFAR batches, webdataset
shards); without them, a fastbyol checkpoint's own training data (and its kNN hold-out), else
the embedded default set. Under ``torchrun``/``deepspeed`` every rank extracts its shard and
the features are gathered; rank 0 prints and writes.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from datetime import timedelta
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as tdist

from ..backbones import feature_dim, first_feature_map_side
from ..checkpoint import export_record_path
from ..config import AugmentConfig, Config, preset
from ..data import resolve_sources
from ..data.eval_views import eval_loader
from ..data.image_source import ImageSource
from ..errors import FastByolError
from ..monitor import headless_pyplot
from .encoder import LoadedEncoder, load_encoder
from ..distributed import rank_and_world
from .features import Features, extract_features
from .linear import (PRESET_FOR_TRAINING, LinearConfig, augmented_batches, evaluate, feature_stats, fitted_batch_size,
                     holdout_split, linear_preset, precomputed_batches, select_lr, train_probe)

log = logging.getLogger("fastbyol")
IMAGE_SIZES = {"imagenet": 224, "cifar": 32, "default": 32}
TRAINING_PRESET = {"imagenet": "imagenet-resnet50", "cifar": "cifar10-resnet18", "default": "default"}
MODE_NAMES = {"full": "full protocol (augmented views through the frozen encoder every epoch)",
              "features": "precomputed features (centre views, no augmentation)"}


# ----------------------------------------------------------------------------- setup

def start_distributed(device_name: str, timeout_minutes: float) -> Tuple[torch.device, bool]:
    """The device of this rank; joins the process group when launched on several ranks
    (torchrun / deepspeed). Returns (device, whether this call created the group)."""
    from ..distributed import backend_for
    from ..runtime import dist_info_from_env
    from ..runtime import resolve_device

    dist = dist_info_from_env()
    device = resolve_device(device_name, dist)
    if dist.world_size > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend_for(device), timeout=timedelta(minutes=timeout_minutes))
        return device, True
    return device, False


def eval_preset(name: Optional[str], loaded: LoadedEncoder, data: Optional[str]) -> str:
    if name:
        return name
    if loaded.config is not None:
        return PRESET_FOR_TRAINING.get(loaded.config.preset, "imagenet")
    if data is None:
        return "default"
    from ..data.sources import is_cifar_dir

    return "cifar" if os.path.isdir(data) and is_cifar_dir(data) else "imagenet"


def require_training_facts(ns, loaded: LoadedEncoder) -> None:
    """A state_dict without a training record says neither the size it was trained at nor the
    protocol that fits it: refuse to guess (224 px and the ImageNet probe are wrong for a 32 px
    encoder), naming the flags that say it."""
    if loaded.kind != "state_dict":
        return
    missing = [] if ns.image_size is not None else ["--image-size N (the side it was trained at)"]
    if "preset" in vars(ns) and ns.preset is None:  # eval linear
        missing.append("--preset imagenet|cifar|default")
    if missing:
        unknown = "image size and protocol are" if len(missing) > 1 else "image size is"
        raise FastByolError(f"{loaded.source} is a state_dict without a training record "
                            f"({export_record_path(loaded.source)}, written by fastbyol export), so its {unknown} "
                            f"unknown: pass {' and '.join(missing)}")


def _labelled(src: ImageSource, what: str, path: Optional[str]) -> None:
    if src.classes == ["."]:
        raise FastByolError(f"{what} {path!r} has no class subfolders, so no labels: evaluation needs "
                            "<root>/<class>/<image> (or CIFAR batches, or shards with .cls)")
    if len(src.classes) < 2:
        raise FastByolError(f"{what} {path!r} holds one class only: nothing to classify")


def eval_sources(loaded: LoadedEncoder, data: Optional[str], val_data: Optional[str], seed: int
                 ) -> Tuple[ImageSource, ImageSource, Config]:
    """(train, val, the config they come from), both labelled, val's labels in train's numbering."""
    cfg = copy.deepcopy(loaded.config) if loaded.config is not None else preset("default")
    if data is not None:
        cfg.data.data, cfg.data.val_data = data, val_data
    elif val_data is not None:
        raise FastByolError("--val-data needs --data (the training images of the probe / the kNN bank)")
    cfg.train.seed = cfg.train.seed if loaded.config is not None else seed
    train, val = resolve_sources(cfg)
    _labelled(train, "--data", cfg.data.data or "embedded default set")
    if len(val) == 0:
        raise FastByolError(f"the validation set ({cfg.data.val_data or 'held out of ' + str(cfg.data.data)}) is empty")
    if list(val.classes) != list(train.classes):
        unknown = sorted(set(val.classes) - set(train.classes))
        if unknown or val.classes == ["."]:
            raise FastByolError(f"--val-data {cfg.data.val_data!r} has classes the training set lacks "
                                f"(e.g. {(unknown or ['.'])[0]!r})")
        remap = np.asarray([train.classes.index(c) for c in val.classes], dtype=np.int64)
        val = ImageSource(labels=remap[val.labels], classes=list(train.classes), files=val.files, array=val.array,
                          root=val.root, tar=val.tar)
    return train, val, cfg


def place(loaded: LoadedEncoder, device: torch.device, size: int) -> torch.nn.Module:
    """The frozen encoder on ``device``: eval mode, no gradients, channels_last on CUDA (and
    on CPU from a 32 px first feature map, as in training)."""
    big = first_feature_map_side(loaded.backbone, loaded.cifar_stem, size) >= 32
    fmt = torch.channels_last if device.type == "cuda" or big else torch.contiguous_format
    return loaded.encoder.to(device, memory_format=fmt).eval().requires_grad_(False)


def out_dir(arg: Optional[str], checkpoint: Optional[str]) -> str:
    if arg:
        return arg
    if checkpoint and os.path.isdir(checkpoint):
        return os.path.join(checkpoint, "eval")
    if checkpoint and os.path.basename(checkpoint) == "checkpoint.pt":
        return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "eval")
    return os.path.join("runs", "eval")


def tag(loaded: LoadedEncoder) -> str:
    if loaded.kind == "random init":
        return "random-init"
    if loaded.kind == "fastbyol checkpoint":
        return "online"
    return os.path.splitext(os.path.basename(loaded.source))[0]


def say(text: str) -> None:
    if rank_and_world()[0] == 0:
        print(text, flush=True)


def write_json(path: str, result: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    os.replace(tmp, path)


class Setup:
    """What both commands need: encoder, data, device, augmentation constants."""

    def __init__(self, ns):
        self.device, self.created_group = start_distributed(ns.device, ns.timeout_minutes)
        self.rank, self.world = rank_and_world()
        self.loaded = load_encoder(ns.checkpoint, ns.backbone, ns.random_init, ns.seed, ns.cifar_stem or None)
        require_training_facts(ns, self.loaded)
        self.preset = eval_preset(getattr(ns, "preset", None), self.loaded, ns.data)
        # the training preset whose kNN monitor `eval knn` repeats (k, T)
        self.monitor_config = self.loaded.config or preset(TRAINING_PRESET[self.preset])
        self.train, self.val, cfg = eval_sources(self.loaded, ns.data, ns.val_data, ns.seed or 0)
        size = ns.image_size or (cfg.augment.image_size if self.loaded.config is not None else IMAGE_SIZES[self.preset])
        self.aug = AugmentConfig(image_size=size, mean=cfg.augment.mean, std=cfg.augment.std)
        self.size, self.workers, self.batch = size, ns.workers, ns.eval_batch
        self.encoder = place(self.loaded, self.device, size)
        self.dim = feature_dim(self.encoder, size)
        self.out = out_dir(ns.out, ns.checkpoint)
        if self.rank == 0:
            from ..runtime import check_writable

            check_writable(self.out)  # before minutes of work, not after
        self.data = {"train": cfg.data.data or "embedded default set (train)",
                     "val": cfg.data.val_data or ("embedded default set (held-out)" if cfg.data.data is None
                                                  else f"{cfg.data.val_fraction:.0%} held out of --data"),
                     "n_train": len(self.train), "n_val": len(self.val), "classes": len(self.train.classes)}

    def features(self, source: ImageSource, gather: bool, l2: bool, cap: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> Features:
        loader = eval_loader(source, self.size, self.batch, self.workers, cap, 0, self.rank, self.world)
        return extract_features(self.encoder, loader, self.device, self.aug, l2_normalize=l2, gather=gather,
                                dtype=dtype)

    def stamp(self) -> Dict:
        return {"encoder": self.loaded.to_dict(), "data": self.data, "device": str(self.device),
                "world_size": self.world, "image_size": self.size, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    def close(self) -> None:
        if self.created_group:
            from ..distributed import close_process_group

            close_process_group()


# ----------------------------------------------------------------------------- kNN

def run_knn(ns) -> Dict:
    s = Setup(ns)
    monitor = s.monitor_config
    ks = ns.k or [monitor.train.knn_k]
    t = ns.t if ns.t is not None else monitor.train.knn_t
    which = f"preset {monitor.preset}"
    k_from = "" if ns.k else " (the training monitor's)"
    say(f"kNN of the {s.loaded.describe()} on {s.data['train']} ({len(s.train)} images) -> "
        f"{s.data['val']} ({len(s.val)} images), {s.size} px, k {','.join(map(str, ks))}{k_from}, T {t}, {which}")
    from .knn import bank_dtype, knn_scores_from_shards

    t0 = time.perf_counter()
    # each rank keeps its shard (bf16 on CUDA); gathered or merged per query: see fastbyol.eval.knn
    bank = s.features(s.train, gather=False, l2=True, cap=ns.max_bank, dtype=bank_dtype(s.device))
    query = s.features(s.val, gather=False, l2=True, dtype=bank_dtype(s.device))
    scores, info = knn_scores_from_shards(bank, query, len(s.train.classes), ks, t)
    result = {"protocol": "weighted kNN (InstDisc: cosine, exp(sim/T) votes)", "t": t, "preset": monitor.preset,
              "k_from": "--k" if ns.k else f"the training monitor of preset {monitor.preset}",
              "bank_images": info["bank_images"], "unreadable": info["unreadable"], "bank_path": info["path"],
              "results": [{"k": k, "top1": a, "top5": b} for k, (a, b) in scores.items()],
              "seconds": time.perf_counter() - t0, **s.stamp()}
    path = os.path.join(s.out, f"knn_{tag(s.loaded)}.json")
    for k, (a, b) in scores.items():
        say(f"kNN (k={k}, T={t}, {s.size} px, {which}) {s.loaded.network}: top-1 {a:.2f}% top-5 {b:.2f}%")
    if s.rank == 0:
        write_json(path, result)
        say(f"wrote {path}")
    s.close()
    return result


# ----------------------------------------------------------------------------- linear

def linear_config(ns, preset_name: str) -> LinearConfig:
    cfg = linear_preset(preset_name)
    for name in ("mode", "epochs", "batch_size", "schedule", "holdout", "standardize"):
        if getattr(ns, name, None) is not None:
            setattr(cfg, name, getattr(ns, name))
    if ns.lr is not None:
        cfg.lrs = tuple(ns.lr)
    if ns.crop_scale is not None:
        cfg.crop_scale = tuple(ns.crop_scale)
    cfg.seed = ns.seed if ns.seed is not None else 0
    return cfg.validate()


def run_linear(ns) -> Dict:
    s = Setup(ns)
    cfg = linear_config(ns, s.preset)
    batch = fitted_batch_size(cfg.batch_size, len(s.train))
    classes = len(s.train.classes)
    say(f"linear probe ({MODE_NAMES[cfg.mode]}) of the {s.loaded.describe()}: {s.data['train']} "
        f"({len(s.train)} images) -> {s.data['val']} ({len(s.val)} images), {classes} classes, {s.size} px, "
        f"preset {s.preset}, {cfg.epochs} epochs, batch {batch}"
        f"{' (fitted to the data set)' if batch != cfg.batch_size else ''}, "
        f"{cfg.schedule} schedule, lr {'grid ' if len(cfg.lrs) > 1 else ''}{','.join(map(str, cfg.lrs))}"
        f"{', standardised features' if cfg.standardize else ''}")
    t0 = time.perf_counter()
    val = s.features(s.val, gather=False, l2=False)
    steps = lambda n: -(-n // batch)  # noqa: E731 (global batches per epoch)
    if cfg.mode == "features":
        train = s.features(s.train, gather=True, l2=False)
        if len(train) == 0:
            raise FastByolError("the training set holds no readable image")

    def rows_of(idx: np.ndarray):
        """The precomputed training features of the samples ``idx``."""
        return train.rows(torch.from_numpy(np.isin(train.index.cpu().numpy(), idx)).to(train.feats.device))

    def batches_for(idx: Optional[np.ndarray]):
        """Batches over all of train (idx None) or over the subset ``idx``."""
        if cfg.mode == "features":
            f = train
            if idx is not None:
                f = rows_of(idx)
                f.index = torch.from_numpy(np.searchsorted(idx, f.index.cpu().numpy())).to(f.feats.device)
            return precomputed_batches(f, batch, cfg.seed)
        src = s.train if idx is None else s.train.subset(idx)
        return augmented_batches(s.encoder, src, s.size, batch, s.workers, cfg, s.device, s.aug, s.dim)

    def progress(label: str, total: int, what: str):
        def show(rec):
            acc = f" {what} top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}%" if "top1" in rec else ""
            say(f"linear [{label}] epoch {rec['epoch']}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.4g}{acc} "
                f"({time.perf_counter() - t0:.0f}s)")
        return show

    stats = None
    if cfg.standardize:  # from the training set's centre views (no labels, nothing of val)
        stats = feature_stats(train if cfg.mode == "features" else s.features(s.train, gather=True, l2=False))
    grid = []
    lr = cfg.lrs[0]
    if len(cfg.lrs) > 1:
        fit, held = holdout_split(s.train.labels, cfg.holdout, cfg.seed)
        if len(held) == 0:
            raise FastByolError("the training set is too small to hold out images for the lr selection; "
                                "pass a single --lr")
        held_f = s.features(s.train.subset(held), gather=False, l2=False) if cfg.mode == "full" else None
        if cfg.mode == "features":
            held_f = rows_of(held)
            if s.world > 1:  # evaluate() sums counts over ranks: give each rank its share
                held_f = held_f.rows(torch.arange(len(held_f), device=held_f.feats.device) % s.world == s.rank)
        say(f"picking the lr on {len(held)} training images held out ({len(fit)} fit)")

        fit_batches = batches_for(fit)  # the same batches for every lr of the grid

        def run_one(lr_: float):
            probe, _ = train_probe(fit_batches, steps(len(fit)), s.dim, classes, lr_, cfg, s.device, None,
                                   progress(f"select lr {lr_:g}", cfg.epochs, "held-out"), stats)
            return evaluate(probe, held_f)

        lr, grid = select_lr(run_one, cfg.lrs)
        for g in grid:
            say(f"lr {g['lr']:g}: held-out top-1 {g['holdout_top1']:.2f}% top-5 {g['holdout_top5']:.2f}%")
        say(f"picked lr {lr:g}; retraining on all {len(s.train)} training images")
    _, history = train_probe(batches_for(None), steps(len(s.train)), s.dim, classes, lr, cfg, s.device, val,
                             progress(f"lr {lr:g}", cfg.epochs, "val"), stats)
    final = history[-1]
    result = {"protocol": "linear", "mode": cfg.mode, "mode_description": MODE_NAMES[cfg.mode],
              "preset": s.preset, "config": {**cfg.__dict__, "batch_size_used": batch},
              "lr": lr, "lr_selection": grid, "top1": final["top1"], "top5": final["top5"],
              "best_top1_over_epochs": max(r["top1"] for r in history), "epochs": history,
              "seconds": time.perf_counter() - t0, **s.stamp()}
    name = f"linear_{cfg.mode}_{tag(s.loaded)}"
    say(f"linear top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}% ({cfg.mode} mode, {s.loaded.network}, "
        f"{s.size} px, preset {s.preset}, lr {lr:g}, {result['seconds']:.0f}s)")
    if s.rank == 0:
        write_json(os.path.join(s.out, name + ".json"), result)
        png = plot_linear(result, os.path.join(s.out, name + ".png"))
        say(f"wrote {os.path.join(s.out, name + '.json')}" + (f" and {png}" if png else ""))
    s.close()
    return result


def plot_linear(result: Dict, path: str) -> Optional[str]:
    """Loss and validation top-1/top-5 of the final probe against epoch."""
    plt = headless_pyplot()
    if plt is None:
        return None
    hist = result["epochs"]
    ep = [r["epoch"] for r in hist]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [r["loss"] for r in hist])
    a.set(xlabel="epoch", ylabel="cross-entropy", title=f"linear probe loss (lr {result['lr']:g})")
    b.plot(ep, [r["top1"] for r in hist], marker=".", label="top-1")
    b.plot(ep, [r["top5"] for r in hist], marker=".", label="top-5")
    b.set(xlabel="epoch", ylabel="val accuracy (%)",
          title=f"{result['mode']} mode, {result['encoder']['network']}")
    b.legend()
    fig.suptitle(result["encoder"]["description"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
