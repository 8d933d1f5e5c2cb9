"""fastbyol's mode of the benchmark: a real :class:`fastbyol.trainer.Trainer`, timed through its
own per-micro-batch step, ``Trainer.train_micro_batch`` (after ``Trainer.start_steps``): the
schedules, the fused EMA and the sync-free NaN guard included, exactly what ``fastbyol train``
runs. Ablations swap one piece through the trainer's own seams (``engine_factory``, the
model's ``loss_fn``), never by re-writing the step."""
from __future__ import annotations

import copy
import shutil
import tempfile
import time
from functools import partial
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from fastbyol.bench.baselines import PerParameterEMA, PerParameterLARS
from fastbyol.config import Config, preset
from fastbyol.data.base import TwoViewBatch

from .configs import Context, Skip
from .data import forever, synthetic_views


class Runner:
    """One mode: ``batches()`` yields inputs forever, ``step(batch)`` is one optimizer step,
    ``close()`` releases what the mode holds (loaders, files)."""

    details: Dict
    online_params: List[torch.Tensor]

    def batches(self) -> Iterator:
        raise NotImplementedError

    def step(self, batch) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def kernels_import():
    try:
        import fastbyol_kernels  # noqa: F401
    except ImportError as e:
        raise Skip(f"fastbyol_kernels not importable ({e})") from None


def dali_import_error() -> Optional[str]:
    """None when fastbyol's DALI loader and DALI itself import, else why not."""
    try:
        from fastbyol.data.dali import DaliTwoViewLoader  # noqa: F401
        import nvidia.dali  # noqa: F401
    except Exception as e:  # not installed, or fastbyol.data.dali not there yet
        return f"DALI loader not importable ({type(e).__name__}: {e})"
    return None


def resolve_full_loader(requested: str, device: torch.device):
    """(loader of the full mode, why it is not DALI or None). ``auto`` is the trainer's choice
    (:func:`fastbyol.data.choose_loader`): DALI on CUDA when it imports, else torch;
    ``dali`` on CPU runs DALI's CPU backend."""
    if requested == "torch":
        return "torch", "--loader torch"
    err = dali_import_error()
    if requested == "dali":
        if err:
            raise SystemExit(f"bench_train: --loader dali: {err}")
        return "dali", None
    if err:
        return "torch", err
    if device.type != "cuda":
        return "torch", "the trainer picks the torch loader on CPU; --loader dali runs DALI's CPU backend"
    return "dali", None


def trainer_config(ctx: Context, loader: str, out: str, compile: bool = False) -> Config:
    """The config a user would run: the benchmark's preset, network and augmentation, reading
    ``ctx.source.root`` with ``loader``, no kNN and no checkpoints (they are not per-step work)."""
    c = ctx.cfg
    cfg = preset(c.preset)
    m = cfg.model
    m.backbone, m.cifar_stem = c.backbone, c.cifar_stem
    m.projector_hidden, m.projection_dim, m.predictor_hidden = c.projector_hidden, c.projection_dim, c.predictor_hidden
    cfg.augment = copy.deepcopy(c.augment)
    cfg.data.data, cfg.data.loader, cfg.data.workers = ctx.source.root, loader, ctx.workers
    t = cfg.train
    t.batch_size, t.precision, t.kernels, t.compile, t.seed = ctx.batch, ctx.precision, ctx.kernels, compile, ctx.seed
    t.device, t.out, t.knn_every, t.ckpt_every, t.max_steps = ctx.device.type, out, 0, 0, None
    return cfg


class AllReduceEngine:
    """The trainer's LocalEngine with DDP's simplest form added before each optimizer step: one
    flat bucket of all gradients, all-reduced and averaged (``--scaling``; times each all-reduce)."""

    def __init__(self, engine):
        self.engine, self.allreduce_s = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self) -> bool:
        t0 = time.perf_counter()
        allreduce_grads([p for p in self.engine.online.parameters() if p.requires_grad])
        self.allreduce_s.append(time.perf_counter() - t0)
        return self.engine.step()


def allreduce_grads(params: List[torch.Tensor]) -> None:
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


def _engine_factory(optimizer: str, allreduce: bool):
    """``Trainer.from_config(engine_factory=...)``: the trainer's own LocalEngine, with the optimizer swapped
    for an ablation (``loop``: per-parameter LARS; ``sgd``: lightly's example optimizer)."""
    if optimizer == "foreach" and not allreduce:
        return None

    def build(model, cfg, device, dist):
        from fastbyol.engines import LocalEngine
        from fastbyol.optim import build_optimizer, param_groups
        from fastbyol.schedules import scaled_lr

        lr, o = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size), cfg.optim
        if optimizer == "loop":
            opt = PerParameterLARS(param_groups(model.online, o.weight_decay), lr=lr, momentum=o.momentum,
                                   trust_coefficient=o.trust_coefficient)
        elif optimizer == "sgd":
            opt = torch.optim.SGD(model.online.parameters(), lr=0.06)
        else:
            opt = build_optimizer(model.online, o, lr, cfg.train.kernels)
        engine = LocalEngine(model.online, opt, device, cfg.train.precision, cfg.dist.grad_accum, cfg.train.compile)
        return AllReduceEngine(engine) if allreduce else engine

    return build


class FastByolRunner(Runner):
    """``Trainer.train_micro_batch`` of a real Trainer, with one piece switchable for the
    ablations: ``loader`` dali|torch|synthetic (synthetic: pre-made views on the device fed to
    the same step: the compute ceiling), ``loss`` fused|eager, ``ema`` fused|loop, ``lars``
    foreach|loop|sgd, ``compile`` (``--train.compile``)."""

    def __init__(self, ctx: Context, loader: str = "dali", loss: str = "fused", ema: str = "fused",
                 lars: str = "foreach", compile: bool = False, channels_last: str = "auto"):
        kernels_import()
        from fastbyol.trainer import Trainer

        self.ctx, self.loader_kind = ctx, loader
        self.out = tempfile.mkdtemp(prefix="fastbyol-bench-")
        # The synthetic mode's trainer still builds a (never iterated) torch loader over the folder.
        cfg = trainer_config(ctx, "torch" if loader == "synthetic" else loader, self.out, compile)
        if loader == "synthetic":
            cfg.data.workers = 0
        cfg.train.channels_last = channels_last  # "off": the NCHW comparison row
        self.trainer = Trainer.from_config(cfg, engine_factory=_engine_factory(lars, ctx.allreduce))
        tr = self.trainer
        self.model, self.engine = tr.model, tr.engine
        if loss == "eager":
            from fastbyol_kernels import byol_loss

            tr.model.loss_fn = partial(byol_loss, backend="torch")
        if ema == "loop":
            loop = PerParameterEMA(nn.ModuleList([tr.model.online.encoder, tr.model.online.projector]),
                                   tr.model.target)
            tr.model.update_target = lambda tau, *a, **kw: loop.update(float(tau))
        tr.start_steps()
        self.online_params = [p for p in tr.model.online.parameters() if p.requires_grad]
        from fastbyol.backbones import memory_format

        channels_last = memory_format(cfg, tr.device) == torch.channels_last
        if loader == "synthetic":
            self.views = synthetic_views(ctx, channels_last)
        self.details = {
            "step": "fastbyol.trainer.Trainer.train_micro_batch (schedules, NaN guard, target EMA)",
            "loader": {"dali": "DALI" + (" (CPU backend)" if ctx.device.type == "cpu" else ""),
                       "torch": "torch DataLoader (host crops) + batched device photometry",
                       "synthetic": "pre-made views on the device"}[loader],
            "loss": f"byol_loss(backend={'torch' if loss == 'eager' else ctx.kernels!r})",
            "ema": f"ModuleEMA(backend={ctx.kernels!r})" if ema == "fused" else "per-parameter loop (baseline)",
            "optimizer": {"foreach": f"{cfg.optim.optimizer.upper()} (multi-tensor foreach)",
                          "loop": "LARS per-parameter loop (baseline)",
                          "sgd": "SGD lr 0.06, no momentum (lightly example's; attribution only)"}[lars],
            "precision": ctx.precision, "channels_last": channels_last, "torch.compile": compile,
        }

    def batches(self):
        if self.loader_kind == "synthetic":
            v1, v2 = self.views
            batch = TwoViewBatch(v1, v2, torch.full((v1.shape[0],), -1, dtype=torch.long, device=v1.device))
            while True:
                yield batch
        loader = self.trainer.loader

        def epoch(e):
            loader.set_epoch(e)
            yield from loader

        yield from forever(epoch)

    def step(self, batch) -> None:
        self.trainer.train_micro_batch(batch)

    def update_target(self) -> None:
        """The target update of one step alone, as the trainer calls it (breakdowns)."""
        tr = self.trainer
        tr.model.update_target(tr.tau, tr._buffers, tr.cfg.train.kernels, source=tr.engine.ema_source())

    def close(self) -> None:
        jsonl = getattr(self.trainer.monitor, "_jsonl", None)
        if jsonl is not None:
            jsonl.close()
        shutil.rmtree(self.out, ignore_errors=True)
