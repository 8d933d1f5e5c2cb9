"""Linear evaluation: a linear layer trained on a frozen encoder's pooled features.

The paper's protocol (BYOL, appendix C.1): the encoder frozen and in eval mode; training views
are random resized crops (area 0.08-1) + horizontal flips, evaluation views resize + centre
crop; SGD with Nesterov momentum 0.9, no weight decay, batch 1024, a cosine (or step)
schedule; the learning rate picked from a small grid on a held-out slice of the training set,
then the layer retrained on the whole training set and evaluated once on the test set.

Two modes share this training loop and differ only in where a batch's features come from:

* ``full``: the protocol. Every epoch, every training image is cropped anew and passed
  through the frozen encoder (rank by rank, gathered into the global batch).
* ``features``: the quick comparison users run. Centre-view features are computed once
  and the layer is fitted on them, without augmentation.

Under several ranks every rank holds the same gathered batch and takes the same step (the
layer is tiny), so the result does not depend on the number of ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FastByolError
from ..distributed import all_reduce_sum, rank_and_world
from .features import Features


@dataclass
class LinearConfig:
    """One linear evaluation (``fastbyol eval linear``'s flags)."""

    mode: str = "full"  # full: the paper's protocol (augmented views every epoch) | features: precomputed, no augmentation
    epochs: int = 90  # training epochs of the linear layer
    batch_size: int = 1024  # global batch; halved while it exceeds 1/8 of the training set
    lrs: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4)  # learning-rate grid (one value: no selection)
    schedule: str = "cosine"  # cosine (per step) | step (x0.1 at the milestones)
    milestones: Tuple[float, ...] = (0.6, 0.8)  # step schedule: fractions of the epochs
    momentum: float = 0.9  # SGD momentum (Nesterov)
    nesterov: bool = True  # Nesterov momentum, as the paper
    weight_decay: float = 0.0  # the paper uses none
    holdout: float = 10009  # held out of train to pick the lr: images (>= 1) or a fraction (< 1)
    crop_scale: Tuple[float, float] = (0.08, 1.0)  # training views' random resized crop area
    standardize: bool = False  # standardise each feature by the training set's mean/std (fixed) before the layer
    seed: int = 0  # layer init, data order and crops

    def validate(self) -> "LinearConfig":
        def check(ok, name, msg):
            if not ok:
                raise FastByolError(f"--{name}: {msg}")
        check(self.mode in ("full", "features"), "mode", "must be full or features")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.batch_size >= 2, "batch-size", "must be >= 2")
        check(len(self.lrs) >= 1 and all(lr > 0 for lr in self.lrs), "lr", "needs one or more values > 0")
        check(self.schedule in ("cosine", "step"), "schedule", "must be cosine or step")
        check(self.holdout > 0, "holdout", "must be > 0")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop-scale", "needs 0 < min <= max <= 1")
        return self


# The paper's ImageNet setting (lr grid and 10,009 held-out images from its appendix; 90
# epochs cosine as lightly); solo-learn's CIFAR recipe (100 epochs, x0.1 at 60 and 80); and
# the embedded data set's, sized for a 2-core CPU.
LINEAR_PRESETS: Dict[str, Callable[[], LinearConfig]] = {
    "imagenet": lambda: LinearConfig(),
    "cifar": lambda: LinearConfig(epochs=100, batch_size=256, lrs=(0.05, 0.1, 0.2, 0.5, 1.0), schedule="step",
                                  holdout=0.1),
    # Standardised: a random-init ConvNet4's features are ~20x smaller than a trained one's, and
    # plain SGD on them stays at chance within 20 epochs (an optimiser artefact, not the
    # representation: kNN on them scores 62%).
    "default": lambda: LinearConfig(epochs=20, batch_size=256, lrs=(0.1, 0.3, 1.0), holdout=0.1, standardize=True),
}
PRESET_FOR_TRAINING = {"imagenet-resnet50": "imagenet", "cifar10-resnet18": "cifar", "default": "default",
                       "smoke": "default"}


def linear_preset(name: str) -> LinearConfig:
    if name not in LINEAR_PRESETS:
        raise FastByolError(f"unknown linear preset {name!r}; choose one of {', '.join(LINEAR_PRESETS)}")
    return LINEAR_PRESETS[name]()


def fitted_batch_size(batch_size: int, n_train: int) -> int:
    """``batch_size`` halved while a training epoch would have fewer than 8 steps (the
    paper's 1024 on 1.28 M images is ~1,250 steps; 1024 on 2,560 would be 3)."""
    while batch_size > 16 and batch_size * 8 > n_train:
        batch_size //= 2
    return batch_size


def holdout_split(labels: np.ndarray, holdout: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: a stratified slice of ``holdout`` images (or that fraction),
    at least one per class with two or more images."""
    n = len(labels)
    fraction = holdout if holdout < 1 else min(0.5, holdout / n)
    rng = np.random.default_rng((seed, 0x11EC))
    fit, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = min(max(int(round(len(idx) * fraction)), 1), len(idx) - 1) if len(idx) > 1 else 0
        held.extend(idx[:k])
        fit.extend(idx[k:])
    return np.sort(np.asarray(fit, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def lr_at(step: int, total: int, epoch: int, lr: float, cfg: LinearConfig) -> float:
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / total))
    return lr * 0.1 ** sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)


@torch.no_grad()
def evaluate(probe: nn.Module, val: Features) -> Tuple[float, float]:
    """(top-1 %, top-5 %) of the probe on features; ``val`` may be this rank's share (counts
    are summed over ranks). One host sync."""
    from .knn import topk_correct

    counts = torch.cat([topk_correct(probe(val.feats), val.labels), val.feats.new_tensor([len(val)])])
    top1, top5, n = all_reduce_sum(counts).tolist()
    if n == 0:
        raise FastByolError("the validation set holds no readable image")
    return 100.0 * top1 / n, 100.0 * top5 / n


Batches = Callable[[int], Iterable[Tuple[torch.Tensor, torch.Tensor]]]


def precomputed_batches(train: Features, batch_size: int, seed: int) -> Batches:
    """Epoch ``e``'s global batches of precomputed features, in the order the full protocol
    visits the images (the same permutation of sample positions)."""
    from ..data.eval_views import global_batches

    # Row r of ``train`` is sample train.index[r]; batches are drawn over sample positions, so a
    # dropped unreadable file leaves its batch one row short, as in the full protocol.
    pos = torch.full((int(train.index.max()) + 1 if len(train) else 0,), -1, dtype=torch.long)
    pos[train.index.cpu()] = torch.arange(len(train))

    def batches(epoch: int):
        for b in global_batches(len(pos), batch_size, seed, epoch):
            rows = pos[torch.from_numpy(b)]
            rows = rows[rows >= 0].to(train.feats.device)
            yield train.feats[rows], train.labels[rows]
    return batches


def augmented_batches(encoder: nn.Module, source, size: int, batch_size: int, workers: int, cfg: LinearConfig,
                      device: torch.device, aug, dim: int) -> Batches:
    """Epoch ``e``'s global batches of the full protocol: each rank crops and encodes its
    share of the batch (:func:`fastbyol.data.eval_views.probe_train_loader`), pads it to a
    fixed size (label -1) and all ranks gather the whole batch, with no host sync."""
    import torch.distributed as tdist

    from ..data.eval_views import probe_train_loader
    from .features import encode

    rank, world = rank_and_world()
    cap = -(-batch_size // world)

    def batches(epoch: int):
        encoder.eval()
        loader = probe_train_loader(source, size, batch_size, workers, cfg.crop_scale, cfg.seed, epoch, rank, world)
        for images, labels, _idx, _bad in loader:
            if world == 1:
                if images is None:  # all unreadable: an empty step, as the padded one of several ranks
                    yield torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
                else:
                    yield encode(encoder, images, device, aug), labels.to(device, non_blocking=True)
                continue
            feats = torch.zeros(cap, dim, device=device)
            lab = torch.full((cap,), -1, dtype=torch.long, device=device)
            if images is not None:
                n = images.shape[0]
                feats[:n] = encode(encoder, images, device, aug)
                lab[:n] = labels.to(device, non_blocking=True)
            parts_f = [torch.empty_like(feats) for _ in range(world)]
            parts_l = [torch.empty_like(lab) for _ in range(world)]
            tdist.all_gather(parts_f, feats)
            tdist.all_gather(parts_l, lab)
            yield torch.cat(parts_f), torch.cat(parts_l)
    return batches


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed statistics (a BatchNorm without affine, frozen): the
    probe stays one affine map of the features, but plain SGD no longer depends on their scale."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", 1.0 / std.clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def feature_stats(train: Features) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of (gathered) training features."""
    return train.feats.mean(0), train.feats.std(0)


def train_probe(batches: Batches, steps_per_epoch: int, dim: int, num_classes: int, lr: float, cfg: LinearConfig,
                device: torch.device, val: Optional[Features] = None,
                progress: Optional[Callable[[Dict], None]] = None,
                stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[nn.Module, List[Dict]]:
    """Train a linear layer ``dim → num_classes`` with SGD (Nesterov) on ``batches(epoch)``;
    after each epoch evaluate on ``val`` (when given) and report a record to ``progress``.
    ``stats``: (mean, std) to standardise features with first (:class:`Standardize`).

    Labels < 0 are padding and ignored. The mean loss of an epoch is read back once per
    epoch (the progress line), never per step.
    """
    torch.manual_seed(cfg.seed)
    linear = nn.Linear(dim, num_classes)
    probe = (nn.Sequential(Standardize(*stats), linear) if stats is not None else linear).to(device)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    total, step, history = cfg.epochs * steps_per_epoch, 0, []
    for epoch in range(cfg.epochs):
        loss_sum, n_steps = torch.zeros((), device=device), 0
        for feats, labels in batches(epoch):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, epoch, lr, cfg)
            logits = probe(feats)
            count = (labels >= 0).sum().clamp(min=1)
            loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none").mul(labels >= 0).sum() / count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step, n_steps = step + 1, n_steps + 1
        rec = {"epoch": epoch + 1, "loss": (loss_sum / max(1, n_steps)).item(), "lr": lr_at(step - 1, total, epoch, lr, cfg)}
        if val is not None:
            rec["top1"], rec["top5"] = evaluate(probe, val)
        history.append(rec)
        if progress is not None:
            progress(rec)
    return probe, history


def select_lr(run_one: Callable[[float], Tuple[float, float]], lrs: Sequence[float]) -> Tuple[float, List[Dict]]:
    """The lr with the best held-out top-1 (ties: the smaller lr) and every grid point's result."""
    grid = []
    for lr in lrs:
        top1, top5 = run_one(lr)
        grid.append({"lr": lr, "holdout_top1": top1, "holdout_top5": top5})
    best = max(grid, key=lambda g: (g["holdout_top1"], -g["lr"]))
    return best["lr"], grid


__all__ = ["LinearConfig", "LINEAR_PRESETS", "linear_preset", "fitted_batch_size", "holdout_split", "train_probe",
           "precomputed_batches", "augmented_batches", "select_lr", "evaluate", "Standardize", "feature_stats"]
