"""Multi-GPU / multi-node BYOL with DeepSpeed: the engine adapter.

``run_deepspeed(cfg, dist)`` is what ``fastbyol train`` runs when launched by ``deepspeed``,
``torchrun`` or with ``--deepspeed true``. The trainer (:mod:`fastbyol.trainer`) is the same
as on one process; only the engine differs (contract: :mod:`fastbyol.engines.contract`).

Design (issue #5):

* **What DeepSpeed owns.** Its engine wraps the online network (encoder + projector +
  predictor) with fastbyol's LARS as the client optimizer. The target network stays outside
  and is updated by the fused EMA straight from the online weights, once per *applied*
  optimizer step: :meth:`DeepSpeedEngine.step` returns True only at an accumulation boundary
  whose update was not skipped.
* **Precision: torch autocast over fp32 weights** (DeepSpeed's ``torch_autocast`` section).
  The weights, gradients and optimizer state stay fp32 and per tensor, so LARS computes true
  per-layer trust ratios and the EMA reads fp32 weights with no master copy in between. bf16
  needs no loss scaling; fp16 uses DeepSpeed's dynamic GradScaler, and a step it skips on
  overflow returns False (DeepSpeed's own ``was_step_applied()`` does not see those skips;
  the scale going down does), so neither the target nor the schedules move.
  DeepSpeed's ``fp16``/``bf16`` modes are refused: they keep half-precision weights on the
  module and hand the optimizer flat fp32 partitions, which would silently turn LARS's
  per-layer trust ratios into per-partition ones, and leave the EMA only rounded weights.
* **ZeRO-1/2 flatten parameter groups into partitions too**, so they are refused with LARS
  (one-line error) and allowed with the elementwise optimizers (``--optim.optimizer sgd|adamw``,
  fp32 or bf16). For BYOL they buy little: ResNet-50's online network has 35 M parameters, so
  LARS's momentum is 140 MB per GPU. ZeRO-3 (partitioned weights) is refused: the EMA needs
  the whole online network on every rank.
* **No DeepSpeed LR scheduler** (the trainer sets the rate every step through
  :meth:`~DeepSpeedEngine.set_lr`) and **no gradient clipping** (DeepSpeed 0.19 clips at 1.0
  unless told otherwise; BYOL does not clip).
* **Checkpoints** (``--out DIR``, which every rank must see): DeepSpeed's
  ``save_checkpoint`` on all ranks writes ``DIR/deepspeed/step00000123/`` (module, LARS
  state, fp16 scaler in ``client_state``); then rank 0 writes ``DIR/checkpoint.pt``
  atomically (config, step, online and target weights, RNG, history and the DeepSpeed tag;
  with ``train.keep_last`` also the numbered copies), and removes the tags no kept checkpoint
  points at. Both are read with ``weights_only=True`` (DeepSpeed's loader is swapped for one). ``--resume DIR`` reads both; ``fastbyol export DIR enc.pt`` reads
  only ``checkpoint.pt``, as for a single-process run.
* **Replicas** (:mod:`fastbyol.distributed`): synchronised BatchNorm with more than one rank
  (:mod:`fastbyol.sync_batchnorm`; ``dist.sync_bn``, default on, as the paper); rank 0's online
  and target parameters and buffers are broadcast at start; without SyncBN, ``checkpoint.pt``
  holds the BatchNorm running statistics averaged over ranks, and each rank's own are kept next
  to DeepSpeed's files, so that a checkpoint does not change the run and a resume continues exactly.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import sys
from typing import Any, Dict, Optional

import torch
import torch.distributed as tdist

from ..backbones import memory_format
from ..checkpoint import atomic_save, fsync_dir, load_checkpoint, safe_load, write_checkpoint
from ..config import Config
from ..distributed import barrier, broadcast_module_state, convert_sync_batchnorm, mean_over_ranks_
from ..errors import FastByolError
from ..optim import build_optimizer
from ..runtime import DistInfo
from ..schedules import scaled_lr
from .contract import StepSeen, autocast_context

DS_DIR = "deepspeed"  # DeepSpeed's checkpoint folder inside --out


class DeepSpeedEngine:
    """fastbyol's engine interface over a ``deepspeed.DeepSpeedEngine`` (see :mod:`fastbyol.engines.contract`).

    Args:
        ds: the DeepSpeed engine wrapping ``model.online`` with the client optimizer.
        model: the :class:`~fastbyol.model.BYOL` (its target is checkpointed and kept in sync here).
        device, precision: where and how the forward runs (``autocast()`` also covers the target).
        dist: this process's rank / world size.
        sync_bn: whether BatchNorm is synchronised (then buffers agree without averaging).
    """

    def __init__(self, ds, model, device: torch.device, precision: str, dist: DistInfo, sync_bn: bool):
        self.ds, self.model, self.device, self.precision = ds, model, device, precision
        self.dist, self.sync_bn = dist, sync_bn
        self.module = ds  # calling the engine runs DeepSpeed's forward hooks (and its autocast)
        opt = getattr(ds, "optimizer", None)
        self._stepped = StepSeen(opt) if isinstance(opt, torch.optim.Optimizer) and self.scaler is not None else None

    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """DeepSpeed's dynamic loss scaler (fp16 without ZeRO), else None."""
        return getattr(self.ds, "torch_autocast_z0_gradscaler", None)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.ds.optimizer

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # divides by the accumulation steps; all-reduces at the boundary

    def step(self) -> bool:
        boundary = self.ds.is_gradient_accumulation_boundary()
        scaler = self.scaler
        # fp16: the scaler reads found-inf on the host in its step (torch's one sync per
        # step) and skips optimizer.step() on overflow; a post-step hook tells which, with no
        # further read. Without a hookable optimizer, a lowered scale means skipped (two more
        # reads). bf16/fp32 runs read nothing.
        hooked = self._stepped is not None
        scale = scaler.get_scale() if boundary and scaler is not None and not hooked else None
        if hooked:
            self._stepped.clear()
        self.ds.step()
        if not boundary:
            return False
        applied = bool(self.ds.was_step_applied())  # ZeRO's own overflow check (a Python flag)
        if hooked:
            applied = applied and self._stepped.seen
        elif scale is not None:
            applied = applied and scaler.get_scale() >= scale  # a lowered scale means skipped
        return applied

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def ema_source(self):
        return self.ds.module  # the online network's own fp32 parameters

    # ------------------------------------------------------------------ checkpoints
    def _free_tag(self, ds_dir: str, step: int) -> str:
        """``step00000123``, or ``step00000123.<k>`` when that folder exists already (the same step
        saved again after resuming from an older checkpoint): a tag a checkpoint points at is never
        rewritten in place. Rank 0 decides (it sees the folder) and tells the others."""
        base, k = f"step{step:08d}", 0
        if self.dist.is_main:
            while os.path.exists(os.path.join(ds_dir, base if k == 0 else f"{base}.{k}")):
                k += 1
        if self.dist.world_size > 1:
            k_t = torch.tensor([k], dtype=torch.int64, device=self.device)
            tdist.broadcast(k_t, src=0)
            k = int(k_t.item())
        return base if k == 0 else f"{base}.{k}"

    def _own_buffers(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """This rank's floating-point buffers (BatchNorm statistics) of both networks, copied."""
        return {net: {k: b.detach().clone() for k, b in getattr(self.model, net).named_buffers() if b.is_floating_point()}
                for net in ("online", "target") if getattr(self.model, net) is not None}

    def save(self, path: str, state: Dict[str, Any], keep_last: int = 0, final: bool = False) -> None:
        """All ranks: DeepSpeed's checkpoint; then rank 0: ``checkpoint.pt`` (atomic, plus the numbered
        copies of ``keep_last``), and removes the tags no kept checkpoint points at.

        Without SyncBN each rank's BatchNorm statistics differ: ``checkpoint.pt`` gets their mean over
        ranks, and each rank also writes its own into the tag, so that a resume at the same world
        size continues exactly. A checkpoint must not change the run, so the live statistics are
        averaged in place only at the ``final`` one (then the replicas end identical)."""
        own = None
        if not self.sync_bn and self.dist.world_size > 1:
            own = self._own_buffers()
            mean = {net: {k: b.clone() for k, b in bufs.items()} for net, bufs in own.items()}
            mean_over_ranks_([b for bufs in mean.values() for b in bufs.values()])
            state = dict(state, **{net: {k: mean[net].get(k, v) for k, v in state[net].items()} for net in mean})
            if final:  # the replicas end identical
                with torch.no_grad():
                    for net, bufs in mean.items():
                        for k, b in getattr(self.model, net).named_buffers():
                            if k in bufs:
                                b.copy_(bufs[k])
        folder = os.path.dirname(os.path.abspath(path))
        ds_dir, step = os.path.join(folder, DS_DIR), int(state["step"])
        tag = self._free_tag(ds_dir, step)
        client = {"fastbyol_step": step,
                  "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        self.ds.save_checkpoint(ds_dir, tag=tag, client_state=client)
        if own is not None:
            atomic_save(own, os.path.join(ds_dir, tag, f"fastbyol_buffers_rank{self.dist.rank}.pt"))
        barrier()
        if self.dist.is_main:
            fsync_dir(ds_dir)
            meta = {"dir": DS_DIR, "tag": tag, "world_size": self.dist.world_size,
                    "zero_stage": int(self.ds.zero_optimization_stage())}
            kept = set(write_checkpoint(dict(state, deepspeed=meta,
                                             optimizer_class=f"deepspeed:{type(self.ds.basic_optimizer).__name__}"),
                                        path, keep_last))
            for name in os.listdir(ds_dir):  # tags no kept checkpoint points at can go
                m = re.match(r"^step(\d+)(\.\d+)?$", name)
                if m and os.path.isdir(os.path.join(ds_dir, name)) and (
                        int(m.group(1)) not in kept or (int(m.group(1)) == step and name != tag)):
                    shutil.rmtree(os.path.join(ds_dir, name), ignore_errors=True)
        barrier()

    def load(self, path: str, state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        state = load_checkpoint(path) if state is None else state
        meta = state.get("deepspeed")
        if not meta:
            raise FastByolError(f"cannot resume {path!r} under DeepSpeed: it was written by a single-process run "
                                "(resume it without --deepspeed and on one process)")
        saved, mine = state.get("optimizer_class"), f"deepspeed:{type(self.ds.basic_optimizer).__name__}"
        if saved != mine:
            raise FastByolError(f"cannot resume {path!r}: it was trained with {saved}, this run uses {mine}")
        ds_dir = os.path.join(os.path.dirname(os.path.abspath(path)), meta["dir"])
        where = os.path.join(ds_dir, meta["tag"])
        if not os.path.isdir(where):
            raise FastByolError(f"cannot resume {path!r}: its DeepSpeed checkpoint {where!r} is missing")
        engine = getattr(self.ds, "checkpoint_engine", None)
        if engine is not None:  # DeepSpeed's own loader unpickles with weights_only=False
            engine.load = lambda p, map_location=None: safe_load(p, "DeepSpeed checkpoint file")
        try:
            loaded, client = self.ds.load_checkpoint(ds_dir, tag=meta["tag"], load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
        except FastByolError:
            raise
        except (RuntimeError, ValueError, KeyError, AssertionError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FastByolError(f"cannot resume {path!r}: DeepSpeed could not load {where!r} ({first})") from None
        if loaded is None:
            raise FastByolError(f"cannot resume {path!r}: DeepSpeed found no checkpoint in {where!r}")
        own = os.path.join(where, f"fastbyol_buffers_rank{self.dist.rank}.pt")
        if meta.get("world_size") == self.dist.world_size and os.path.isfile(own):
            mine = safe_load(own, "DeepSpeed checkpoint file")  # this rank's own BatchNorm statistics
            state = dict(state, **{net: {**state[net], **bufs} for net, bufs in mine.items() if state.get(net)})
        if self.scaler is not None and (client or {}).get("grad_scaler"):
            self.scaler.load_state_dict(client["grad_scaler"])
        return state


def import_deepspeed(device: torch.device):
    """``import deepspeed`` on the accelerator matching ``device`` (CPU runs pin DS_ACCELERATOR=cpu,
    so that ``--train.device cpu`` on a GPU machine really runs on the CPU)."""
    if device.type == "cpu" and "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        raise FastByolError("--dist.deepspeed needs DeepSpeed: pip install deepspeed==0.19.8") from None
    accel = get_accelerator().device_name()
    if accel != device.type:
        raise FastByolError(f"DeepSpeed's accelerator is {accel!r} but the training device is {device}: "
                            f"set --train.device {accel}, or DS_ACCELERATOR={device.type}")
    return deepspeed


def make_engine(model, cfg: Config, device: torch.device, dist: DistInfo, ds_config: Dict[str, Any],
                optimizer_factory=None) -> DeepSpeedEngine:
    """The trainer's ``engine_factory``: SyncBN, identical replicas, DeepSpeed around ``model.online``.
    ``optimizer_factory(params)`` replaces the configured optimizer (fastbyol.compat)."""
    deepspeed = import_deepspeed(device)
    sync_bn = convert_sync_batchnorm(model, dist.world_size, cfg.dist.sync_bn)
    broadcast_module_state(model.online, model.target)
    optimizer = (optimizer_factory(model.online.parameters()) if optimizer_factory is not None else
                 build_optimizer(model.online, cfg.optim, scaled_lr(cfg.optim.base_lr, cfg.train.batch_size),
                                 cfg.train.kernels))
    # DeepSpeed broadcasts the weights as raw bytes, which needs row-major tensors; ZeRO then
    # re-points them into its flat buffers. Stage 0 gets its layout back (the same layout
    # as a single-process run); under ZeRO the target follows the online network, so that
    # both sides of the EMA share one layout. (.to() swaps .data: the Parameters stay the same.)
    model.online.to(memory_format=torch.contiguous_format)
    ds, _, _, _ = deepspeed.initialize(model=model.online, optimizer=optimizer, config=copy.deepcopy(ds_config),
                                       dist_init_required=False)
    if ds.zero_optimization_stage() == 0:
        model.online.to(memory_format=memory_format(cfg, device))
    elif model.target is not None:
        model.target.to(memory_format=torch.contiguous_format)
    if cfg.train.compile:
        ds.compile()
    return DeepSpeedEngine(ds, model, device, cfg.train.precision, dist, sync_bn)
