"""Data-parallel plumbing: process group, synchronised BatchNorm, identical replicas on every rank.

DeepSpeed all-reduces gradients and broadcasts the engine's parameters once, but it never
touches buffers, and fastbyol's target network is not part of the engine at all. So the
replicas are made identical here, explicitly:

* at start, rank 0's online and target parameters *and* buffers are broadcast to every rank
  (:func:`broadcast_module_state`);
* parameters then stay identical by construction: the same all-reduced gradients, the same
  optimizer maths, the same EMA;
* BatchNorm running statistics are identical under synchronised BatchNorm (``dist.sync_bn``,
  the paper's setting, on any device: :mod:`fastbyol.sync_batchnorm`). Without it
  (``--dist.sync_bn false``) each rank's follow its own shard; :func:`mean_over_ranks_` replaces
  them by their mean over ranks (timm's ``distribute_bn(reduce=True)``) in every checkpoint, so
  the saved model is the same whichever rank wrote it (the live ones only at the final
  checkpoint; see :meth:`fastbyol.engines.deepspeed_engine.DeepSpeedEngine.save`).

Everything here is plain ``torch.distributed`` and works with any launcher.
"""
from __future__ import annotations

import itertools
import os
import socket
from typing import Optional, Tuple

import torch
import torch.distributed as tdist
from torch import nn

def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port nobody listens on right now (for single-process runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """Fill in the rendezvous variables a launcher would set, so that ``fastbyol train
    --deepspeed true`` also runs as a plain single process."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def convert_sync_batchnorm(model: nn.Module, world: int, enabled: bool) -> bool:
    """Turn every BatchNorm of ``model.online`` and ``model.target`` into
    :class:`~fastbyol.sync_batchnorm.SyncFreeBatchNorm` (statistics over all ranks, per view:
    one all-reduce per layer, no host sync; any backend, so CPU/gloo runs are synchronised too).

    Only with more than one rank and when ``enabled``. Returns whether the conversion happened.
    Module names are unchanged, so the EMA pairing still holds.
    """
    from .sync_batchnorm import convert_to_sync_free

    if not enabled or world <= 1:
        return False
    model.online = convert_to_sync_free(model.online)
    if getattr(model, "target", None) is not None:
        model.target = convert_to_sync_free(model.target)
    return True


def _state_tensors(*modules: Optional[nn.Module]):
    return itertools.chain.from_iterable(
        itertools.chain(m.parameters(), m.buffers()) for m in modules if m is not None)


@torch.no_grad()
def broadcast_module_state(*modules: Optional[nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``modules`` to every rank (in place)."""
    if world_size() <= 1:
        return
    for t in _state_tensors(*modules):
        if t.is_contiguous():
            tdist.broadcast(t.data, src=src)
        else:  # channels_last conv weights: collectives want dense row-major buffers
            buf = t.detach().contiguous()
            tdist.broadcast(buf, src=src)
            t.data.copy_(buf)


@torch.no_grad()
def mean_over_ranks_(tensors) -> None:
    """Replace each tensor by its mean over ranks (in place; nothing with one rank)."""
    world = world_size()
    if world <= 1:
        return
    for t in tensors:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(world)


def rank_and_world() -> Tuple[int, int]:
    """This process's rank and the world size (0, 1 without a process group)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (in place; ``t`` itself without a process group)."""
    if world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def sum_over_ranks(value: int, device: torch.device) -> int:
    """``value`` summed over all ranks (a collective and a host sync: call at the end of a run)."""
    if world_size() <= 1:
        return int(value)
    return int(all_reduce_sum(torch.tensor([int(value)], dtype=torch.int64, device=device)).item())


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def close_process_group() -> None:
    """Barrier, then ``destroy_process_group``: call once, after success, on every rank.

    Without the barrier a rank can tear its gloo group down while a peer is still inside
    the last collective; that peer then aborts at exit ("terminate called without an active
    exception", SIGABRT) and the launcher reports a finished run as failed.
    """
    if tdist.is_initialized():
        barrier()
        tdist.destroy_process_group()
