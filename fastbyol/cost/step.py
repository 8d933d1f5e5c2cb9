"""Drive the product's training step on ``meta`` tensors and attribute every op to a stage.

What runs is :class:`fastbyol.trainer.Trainer` itself (given parts that swap only the
data source, the loader and the model: no data, the model built on ``meta``) and
its :meth:`~fastbyol.trainer.Trainer.train_micro_batch`, with the views from
:func:`fastbyol.augment.augment_pair`, what the torch loader runs on the training device. The
``meta`` tensors stand for CUDA tensors: every choice the code makes by device is made as on
CUDA (the views' dtype and layout, ``torch.where`` selection in the augmentation, the Triton
loss and EMA, counted from their launch descriptions instead of run). Two things meta tensors
cannot do are supplied here, and stated:

* **autocast**: torch's autocast is a per-backend dispatch key and there is none for ``meta``,
  so :class:`CudaAutocast` applies CUDA autocast's policy to the ops these networks use
  (convolutions, linear layers and matmuls in the low-precision dtype; its fp32 list in fp32;
  a leaf parameter's cast cached for the autocast region, as torch does);
* **collectives** (``world_size > 1``): the model is converted to ``SyncFreeBatchNorm`` as the
  multi-GPU engine does and its all-reduces are recorded, not run; the gradient all-reduce of
  the data-parallel engine is added as one all-reduce of every online gradient (fp32, in
  25 MB buckets, not overlapped with the backward).

One warm-up step runs first (momentum buffers, the EMA's block tables, cached constants are
created there, as in any run's first step); the second step is the one counted.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..augment import augment_pair, draw_batch
from ..backbones import memory_format
from ..config import Config
from ..data.base import TwoViewBatch
from ..data import view_dtype
from ..engines import DTYPES, LocalEngine
from ..errors import FastByolError
from ..optim import build_optimizer, is_excluded
from ..schedules import scaled_lr
from ..runtime import DistInfo
from ..parts import TrainerParts, build_model, build_parts
from ..trainer import Trainer
from .counter import CostCounter, OpCost, Record, launch_cost, spanned_bytes

STAGES = ("augmentation", "forward", "backward", "batchnorm", "loss", "ema", "optimizer", "collectives", "other")
CUDA = torch.device("cuda")  # the device the meta tensors stand for (a name: nothing is allocated)
_ADDRESSES = itertools.count(1)  # fake storage addresses, never reused (the EMA caches its tables by address)
GRAD_BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket
SOURCE_HW = (375, 500)  # the image size the crop boxes are drawn for (a typical ImageNet photo; no cost depends on it)


# ----------------------------------------------------------------------------- autocast on meta

_F = torch.nn.functional
LOW_PRECISION_FNS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
                     torch.conv_transpose3d, _F.linear, torch.matmul, torch.mm, torch.addmm, torch.bmm, torch.baddbmm,
                     torch.addbmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}
FP32_FNS = {torch.norm, torch.linalg.vector_norm, torch.Tensor.norm, _F.normalize, _F.layer_norm, _F.group_norm,
            _F.softmax, _F.log_softmax, _F.cross_entropy, _F.mse_loss, _F.cosine_similarity, torch.exp, torch.log,
            torch.rsqrt, torch.pow, torch.cumsum, torch.Tensor.exp, torch.Tensor.log, torch.Tensor.pow}


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's policy for the functions above, on tensors of any device (``meta``)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self._cache: Dict[int, tuple] = {}

    def _cast(self, x, dtype: torch.dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype and x.dtype != torch.float64):
            return x
        if x.is_leaf and x.requires_grad:  # torch caches these casts until the autocast region ends
            hit = self._cache.get(id(x))
            if hit is None or hit[0] is not x or hit[1].dtype != dtype:
                hit = (x, x.to(dtype))
                self._cache[id(x)] = hit
            return hit[1]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.dtype if func in LOW_PRECISION_FNS else torch.float32 if func in FP32_FNS else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- the trainer on meta

class _NoLoader:
    """The loader slot of a cost run: one batch an epoch, made by :func:`step_cost` itself."""

    skipped = 0

    def __len__(self) -> int:
        return 1


class CostEngine(LocalEngine):
    """:class:`~fastbyol.engines.local.LocalEngine` with its precision context as on CUDA, and each of
    its phases scoped to a stage."""

    def __init__(self, online, optimizer, precision: str, counter: CostCounter, grad_accum: int):
        super().__init__(online, optimizer, torch.device("meta"), "fp32", grad_accum)
        self.precision, self.counter = precision, counter

    @contextlib.contextmanager
    def autocast(self):
        with self.counter.scope("forward"), (CudaAutocast(DTYPES[self.precision]) if self.precision != "fp32"
                                             else contextlib.nullcontext()):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        with self.counter.scope("backward"):
            super().backward(loss)

    def step(self) -> bool:
        with self.counter.scope("optimizer"):
            return super().step()


class _NoSource:
    """The data slot of a cost run: as many images as any batch asks for, none to read."""

    classes = ["."]

    def __len__(self) -> int:
        return 1 << 40


def cost_parts(cfg: Config, dist: DistInfo, engine_factory) -> TrainerParts:
    """The trainer's parts for a cost run: no data, the model on ``meta`` (nothing to load)."""
    from ..distributed import convert_sync_batchnorm

    def model_factory(device):
        with torch.device("meta"):
            model = build_model(cfg, torch.device("meta"))
        convert_sync_batchnorm(model, dist.world_size, cfg.dist.sync_bn)
        return model

    return build_parts(cfg, dist, sources=(_NoSource(), None), loader_factory=lambda *args: _NoLoader(),
                       model_factory=model_factory, engine_factory=engine_factory,
                       data_description="meta tensors (no data)", rerunnable=False)


def cost_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with its device-dependent choices made as on CUDA."""
    if cfg.train.precision == "fp16":
        raise FastByolError("fastbyol cost models bf16 and fp32 (fp16's loss scaling reads the device every step)")
    if cfg.train.compile:
        raise FastByolError("fastbyol cost models the eager step: --train.compile is not modelled")
    cfg = copy.deepcopy(cfg)
    cfg.train.channels_last = "on" if memory_format(cfg, CUDA) == torch.channels_last else "off"
    cfg.train.device, cfg.train.knn_every, cfg.train.resume = "cpu", 0, None
    cfg.data.loader = "torch"
    return cfg


# ----------------------------------------------------------------------------- stage hooks

def _hook_backward(counter: CostCounter, out, stage: str) -> None:
    """Scope the backward of the autograd node that produced ``out`` to ``stage``."""
    node = getattr(out, "grad_fn", None)
    if node is None:
        return
    closers = []
    node.register_prehook(lambda grads: closers.append(counter.push(stage)) and None)
    node.register_hook(lambda grads_in, grads_out: closers.pop()() if closers else None)


@dataclass
class Floors:
    """Bytes each stage must move at least (see :func:`floors`)."""

    bn_bytes: int = 0
    loss_bytes: int = 0


def _instrument(trainer: Trainer, counter: CostCounter, floors: Floors) -> None:
    model = trainer.model

    def bn_pre(module, inputs):
        module._cost_close = counter.push("batchnorm")

    def bn_post(module, inputs, out):
        module._cost_close()
        x = inputs[0]
        if module.training:
            floors.bn_bytes += 3 * x.numel() * x.element_size()
            if out.requires_grad:
                floors.bn_bytes += 5 * x.numel() * x.element_size()
                _hook_backward(counter, out, "batchnorm")
        else:
            floors.bn_bytes += 2 * x.numel() * x.element_size()

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(bn_pre)
            m.register_forward_hook(bn_post)

    loss_fn = model.loss_fn

    def staged_loss(p1, p2, z1, z2):
        with counter.scope("loss"):
            loss = loss_fn(p1, p2, z1, z2)
        ins = (p1, p2, z1, z2)
        floors.loss_bytes += sum(t.numel() * t.element_size() for t in ins)  # forward: each row read once
        floors.loss_bytes += sum(t.numel() * t.element_size() * (2 if t.requires_grad else 1) for t in ins)
        _hook_backward(counter, loss, "loss")
        return loss

    model.loss_fn = staged_loss
    update_target = model.update_target

    def staged_update(*args, **kwargs):
        with counter.scope("ema"):
            return update_target(*args, **kwargs)

    model.update_target = staged_update


@contextlib.contextmanager
def _device_layer(counter: CostCounter, world_size: int):
    """Triton launches counted from their descriptions instead of run (the kernels are chosen
    for ``meta`` tensors as for CUDA ones); SyncFreeBatchNorm's all-reduces recorded."""
    import fastbyol_kernels.ema as kema
    import fastbyol_kernels.lars as klars
    from fastbyol_kernels._backend import counted_as_cuda
    from fastbyol_kernels.launches import Launch

    from .. import batchnorm_ops, sync_batchnorm

    def record_launch(launch, fn=None):
        counter.add(launch_cost(launch, counter))

    def all_reduce(t):
        counter.add(OpCost("all_reduce", 1, t.numel() * t.element_size(), 0, kind="collective"), "collectives")
        return t

    real_data_ptr = torch.Tensor.data_ptr
    bases: Dict[int, int] = {}

    def data_ptr(t):
        # Meta tensors all report address 0; the kernels' callers compare and align addresses
        # (the EMA's "same tensor" check, its block tables), so each storage gets its own.
        if t.device.type != "meta":
            return real_data_ptr(t)
        storage = t.untyped_storage()
        base = bases.get(storage._cdata)
        if base is None:
            base = bases[storage._cdata] = next(_ADDRESSES) << 40  # 1 TB apart: no two overlap
        return base + t.storage_offset() * t.element_size()

    real_tensor = torch.tensor

    def tensor(data, *args, **kwargs):
        # A table built from a Python list straight on the device (the EMA's block lengths)
        # passes no aten op the counter sees: keep its values here.
        out = real_tensor(data, *args, **kwargs)
        if out.device.type == "meta" and out.numel() <= 1 << 20:
            counter.remember(out, real_tensor(data, dtype=out.dtype))
        return out

    def native_bn(name, reads):
        """The fused CUDA BatchNorm primitive ``name`` (fastbyol.batchnorm_ops): its outputs
        from the reference (not counted), its cost as the CUDA kernel's, which reads each input
        tensor once and writes its outputs once."""
        reference = getattr(batchnorm_ops.REFERENCE, name)

        def run(*args, **kwargs):
            recording, counter.recording = counter.recording, False
            try:
                out = reference(*args, **kwargs)
            finally:
                counter.recording = recording
            inputs = [t for t in reads(*args) if isinstance(t, torch.Tensor)]
            read = sum(spanned_bytes(t) for t in inputs)
            written = sum(spanned_bytes(t) for t in _flat(out) if isinstance(t, torch.Tensor))
            flops = 4 * max((t.numel() for t in inputs), default=0)  # a few per element: memory-bound
            counter.add(OpCost(f"cuda:batch_norm_{name}", 1, read, written, flops))
            return out
        return run

    def _flat(out):
        return out if isinstance(out, (tuple, list)) else (out,)

    modelled_native = SimpleNamespace(
        stats=native_bn("stats", lambda x, eps: (x,)),
        gather_stats_with_counts=native_bn("gather_stats_with_counts",
                                           lambda x, mean_all, invstd_all, *rest: (mean_all, invstd_all, rest[-1])),
        elemt=native_bn("elemt", lambda x, w, b, mean, invstd, *rest: (x, w, b, mean, invstd)),
        backward_reduce=native_bn("backward_reduce", lambda dy, x, mean, invstd, w, *rest: (dy, x, mean, invstd, w)),
        backward_elemt=native_bn("backward_elemt", lambda dy, x, mean, invstd, w, *rest: (dy, x, mean, invstd, w, *rest)))

    def ops_for(x):
        device = x if isinstance(x, torch.device) else x.device
        return modelled_native if device.type == "meta" else real_ops_for(device)

    real_ops_for = batchnorm_ops.ops_for
    saved = [(torch.Tensor, "data_ptr", real_data_ptr), (torch, "tensor", real_tensor),
             (batchnorm_ops, "ops_for", real_ops_for), (sync_batchnorm, "ops_for", sync_batchnorm.ops_for),
             (Launch, "run", Launch.run), (kema, "_plans", kema._plans),
             (klars, "_plans", klars._plans), (klars, "_ready", klars._ready), (sync_batchnorm, "_all_reduce_sum", sync_batchnorm._all_reduce_sum),
             (torch.distributed, "is_initialized", torch.distributed.is_initialized),
             (torch.distributed, "get_world_size", torch.distributed.get_world_size),
             (torch.distributed, "get_rank", torch.distributed.get_rank)]
    torch.Tensor.data_ptr, torch.tensor = data_ptr, tensor
    # The EMA's and LARS's block tables are this run's (their lengths are remembered by this counter).
    kema._plans, klars._plans, klars._ready = {}, {}, {}
    Launch.run = record_launch
    sync_batchnorm._all_reduce_sum = all_reduce
    batchnorm_ops.ops_for = sync_batchnorm.ops_for = ops_for  # meta stands for CUDA: the fused kernels
    if world_size > 1:  # this process stands for rank 0 of world_size
        torch.distributed.is_initialized = lambda: True
        torch.distributed.get_world_size = lambda group=None: world_size
        torch.distributed.get_rank = lambda group=None: 0
    try:
        with counted_as_cuda("meta"):
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ----------------------------------------------------------------------------- the step

@dataclass
class StepCost:
    """The counted step: every op's record, the stage floors, and what was run."""

    records: List[Record]
    floors: Dict[str, Optional[int]]
    config: Dict
    world_size: int
    micro_batch: int
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    def stage_records(self, stage: str) -> List[Record]:
        return [r for r in self.records if r.stage == stage]

    def stage_bytes(self) -> Dict[str, int]:
        out = {s: 0 for s in STAGES}
        for r in self.records:
            if r.cost.kind != "transfer":
                out[r.stage] = out.get(r.stage, 0) + r.cost.bytes
        return out


def _optimizer_floor(trainer: Trainer) -> int:
    """LARS: 28 B per adapted fp32 parameter (norms: read w, g; update: read w, g, buf, write w,
    buf), 20 per excluded one; SGD 20; AdamW 28 (read w, g, m, v, write w, m, v)."""
    name = trainer.cfg.optim.optimizer
    total = 0
    for p in trainer.model.online.parameters():
        if p.requires_grad:
            passes = 7 if name == "adamw" or (name == "lars" and not is_excluded("", p)) else 5
            total += passes * p.numel() * p.element_size()
    return total


def _ema_floor(trainer: Trainer) -> int:
    """Read target and online, write target: 12 B per fp32 parameter."""
    from ..model import online_pairs

    online = list(online_pairs(trainer.model.online).parameters())
    target = list(nn.ModuleList([trainer.model.target.encoder, trainer.model.target.projector]).parameters())
    return sum(t.numel() * (2 * t.element_size() + o.element_size()) for t, o in zip(target, online))


def _grad_all_reduce(trainer: Trainer) -> OpCost:
    grads = [p for p in trainer.model.online.parameters() if p.requires_grad]
    nbytes = sum(p.numel() * p.element_size() for p in grads)
    return OpCost("all_reduce(gradients)", max(1, math.ceil(nbytes / GRAD_BUCKET_BYTES)), nbytes, 0, kind="collective")


def step_cost(cfg: Config, world_size: int = 1) -> StepCost:
    """Count one steady-state training step of ``cfg`` (its global batch over ``world_size``
    GPUs; the counted rank's micro-batch is ``batch_size / (world_size · grad_accum)``)."""
    if world_size < 1:
        raise FastByolError("--world-size must be >= 1")
    t0 = time.perf_counter()
    cfg = cost_config(cfg)
    counter = CostCounter(recording=False)
    floors = Floors()
    with tempfile.TemporaryDirectory() as out, _device_layer(counter, world_size):
        cfg.train.out = out
        dist = DistInfo(rank=0, world_size=world_size)
        precision = cfg.train.precision

        def engine_factory(model, cfg_, device, dist_):
            opt = build_optimizer(model.online, cfg_.optim, scaled_lr(cfg_.optim.base_lr, cfg_.train.batch_size),
                                  cfg_.train.kernels)
            return CostEngine(model.online, opt, precision, counter, cfg_.dist.grad_accum)

        with torch.device("meta"):
            trainer = Trainer(cfg, cost_parts(cfg, dist, engine_factory))
        trainer.device = torch.device("meta")
        _instrument(trainer, counter, floors)
        aug = cfg.augment
        size, micro = aug.image_size, trainer.micro_batch
        draws = draw_batch(micro, SOURCE_HW[0], SOURCE_HW[1], aug, seed=cfg.train.seed)
        out_dtype = view_dtype(precision, CUDA)
        channels_last = cfg.train.channels_last == "on"
        with counter:
            trainer.start_steps()
            for recording in (False, True):  # a warm-up step, then the counted one
                counter.recording = recording
                floors.bn_bytes = floors.loss_bytes = 0
                for _ in range(cfg.dist.grad_accum):
                    crops = torch.empty(micro, 2, 3, size, size, dtype=torch.uint8, device="meta")
                    with counter.scope("augmentation"):
                        v1, v2 = augment_pair(crops, aug, draws, out_dtype, channels_last, cfg.train.kernels)
                    trainer.train_micro_batch(TwoViewBatch(v1, v2, torch.empty(micro, dtype=torch.long, device="meta")))
                    if world_size > 1:
                        counter.add(_grad_all_reduce(trainer), "collectives")
        accum = cfg.dist.grad_accum
        view_bytes = 2 * 3 * size * size * micro * (1 + torch.empty((), dtype=out_dtype).element_size())
        records = counter.records
        conv_mm = {s: sum(r.cost.bytes for r in records if r.stage == s and r.cost.kind in ("conv", "matmul"))
                   for s in ("forward", "backward")}
        floor = {
            "augmentation": accum * view_bytes, "forward": conv_mm["forward"], "backward": conv_mm["backward"],
            "batchnorm": floors.bn_bytes, "loss": floors.loss_bytes, "ema": _ema_floor(trainer),
            "optimizer": _optimizer_floor(trainer), "collectives": None, "other": None,
        }
        notes = [
            "meta tensors stand for CUDA tensors; CUDA autocast's policy applied by fastbyol.cost.step.CudaAutocast",
            "floors: augmentation reads the uint8 crops and writes the views once; forward/backward are their "
            "convolutions' and matmuls' traffic (every element-wise op fused away); BatchNorm 3 passes forward, "
            "5 backward (6 and 10 B/element in bf16); loss reads its inputs once a pass and writes the gradients; "
            "EMA 12 B and LARS 28 B per fp32 parameter (20 for excluded ones)",
        ]
        if world_size > 1:
            notes.append(f"world size {world_size}: SyncFreeBatchNorm all-reduces counted from the real layer; the "
                         "gradient all-reduce modelled as every online gradient (fp32) in 25 MB buckets, "
                         "not overlapped")
        return StepCost(records=list(records), floors=floor, config=cfg.to_dict(), world_size=world_size,
                        micro_batch=micro, seconds=time.perf_counter() - t0, notes=notes)
