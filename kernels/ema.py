"""One-pass multi-tensor EMA: ``target ← m·target + (1 − m)·online`` over whole lists.

The kernel walks a block table (tensor index, offset) over all tensors of a dtype pair,
reading each tensor's address from a pointer table, so one launch covers any number of
tensors and every element is read once and written once (12 bytes per fp32 parameter,
the floor). Tables are built once per list of tensors and cached by their addresses, so a
training step's update costs a dict lookup on the host. ``momentum`` may be a 0-d device
tensor, read inside the kernel: no host sync, CUDA-graph capturable.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch

from ._backend import use_triton

Momentum = Union[float, torch.Tensor]
BLOCK = 4096  # elements per program: large enough to stream at full bandwidth


# ----------------------------------------------------------------------------- reference

@torch.no_grad()
def ema_update_reference_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: Momentum) -> None:
    """Plain PyTorch EMA (multi-tensor ``_foreach`` per dtype group; the CPU fallback)."""
    for (tdt, odt), idx in _dtype_groups(targets, onlines).items():
        ts = [targets[i] for i in idx]
        os_ = [onlines[i] if odt == tdt else onlines[i].to(tdt) for i in idx]
        if tdt in (torch.float32, torch.float64) and not isinstance(momentum, torch.Tensor):
            torch._foreach_lerp_(ts, os_, 1.0 - momentum)  # one pass (timm's ModelEmaV3)
        elif tdt in (torch.float32, torch.float64):  # tensor momentum: stays on device
            torch._foreach_mul_(ts, momentum)
            torch._foreach_add_(ts, torch._foreach_mul(os_, 1 - momentum))
        else:  # low-precision targets: compute in fp32, round once
            for t, o in zip(ts, os_):
                t.copy_(momentum * t.float() + (1 - momentum) * o.float())


def _dtype_groups(targets, onlines) -> Dict[Tuple[torch.dtype, torch.dtype], List[int]]:
    groups: Dict[Tuple[torch.dtype, torch.dtype], List[int]] = {}
    for i, (t, o) in enumerate(zip(targets, onlines)):
        groups.setdefault((t.dtype, o.dtype), []).append(i)
    return groups


# ----------------------------------------------------------------------------- Triton

def _get_kernel():
    import triton.language as tl

    from ._triton_ema import ema_kernel  # triton is imported only here

    _TL_DTYPES.update({torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16})
    return ema_kernel


_TL_DTYPES = {}


class _Plan:
    """Pointer and block tables of one dtype group, on the tensors' device."""

    def __init__(self, ts: List[torch.Tensor], os_: List[torch.Tensor], block: int):
        dev = ts[0].device
        numels = [t.numel() for t in ts]
        blocks = [(i, off) for i, n in enumerate(numels) for off in range(0, n, block)]
        self.t_table = torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=dev)
        self.o_table = torch.tensor([o.data_ptr() for o in os_], dtype=torch.int64, device=dev)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=dev)
        self.blk_tensor = torch.tensor([b[0] for b in blocks], dtype=torch.int32, device=dev)
        self.blk_offset = torch.tensor([b[1] for b in blocks], dtype=torch.int64, device=dev)
        self.n_blocks = len(blocks)
        self.t_dtype, self.o_dtype = ts[0].dtype, os_[0].dtype
        self.keepalive = (ts, os_)  # the tables hold raw addresses: keep the tensors alive


_plans: Dict[tuple, List[_Plan]] = {}
_MAX_PLANS = 64


def _plan(targets, onlines, block: int) -> List[_Plan]:
    key = (block,) + tuple((t.data_ptr(), o.data_ptr(), t.numel(), t.dtype, o.dtype) for t, o in zip(targets, onlines))
    plans = _plans.get(key)
    if plans is None:
        plans = [_Plan([targets[i] for i in idx], [onlines[i] for i in idx], block)
                 for idx in _dtype_groups(targets, onlines).values()]
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plans
    return plans


def _ema_triton_(targets, onlines, momentum: Momentum, block: int = BLOCK) -> None:
    kernel = _get_kernel()
    m_is_tensor = isinstance(momentum, torch.Tensor)
    for plan in _plan(targets, onlines, block):
        m_ptr = momentum if m_is_tensor else plan.numels  # unused pointer when a float is given
        kernel[(plan.n_blocks,)](plan.t_table, plan.o_table, plan.numels, plan.blk_tensor, plan.blk_offset,
                                 m_ptr, 0.0 if m_is_tensor else float(momentum),
                                 T_DTYPE=_TL_DTYPES[plan.t_dtype], O_DTYPE=_TL_DTYPES[plan.o_dtype],
                                 M_IS_TENSOR=m_is_tensor, BLOCK=block, num_warps=8)


# ----------------------------------------------------------------------------- public API

def _validate(targets, onlines) -> None:
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update_: {len(targets)} targets but {len(onlines)} onlines")
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if t.shape != o.shape:
            raise ValueError(f"ema_update_: tensor {i}: target shape {tuple(t.shape)} != online {tuple(o.shape)}")
        if t.device != o.device:
            raise ValueError(f"ema_update_: tensor {i}: target on {t.device}, online on {o.device}")
        if not (t.is_floating_point() and o.is_floating_point()):
            raise ValueError(f"ema_update_: tensor {i} is not floating point ({t.dtype}, {o.dtype})")


@torch.no_grad()
def ema_update_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: Momentum, *,
                backend: str = "auto") -> None:
    """In place, for every pair: ``target ← m·target + (1 − m)·online``.

    Args:
        targets: tensors updated in place (fp32, bf16 or fp16), any mix of shapes.
        onlines: same shapes; their dtype may differ from the target's (e.g. bf16 → fp32).
        momentum: a Python float or a 0-d tensor on the tensors' device (read on device, no
            host sync). ``1`` leaves targets bit-identical, ``0`` copies the onlines.
        backend: ``auto`` | ``triton`` | ``torch``.

    Triton: one launch per (target dtype, online dtype) group, each element read and written
    once. Tensors must be contiguous.

    Examples:
        >>> ema_update_(list(target.parameters()), list(online.parameters()), 0.996)
    """
    targets, onlines = list(targets), list(onlines)
    _validate(targets, onlines)
    if not targets:
        return
    if not use_triton(backend, targets + onlines):
        ema_update_reference_(targets, onlines, momentum)
        return
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if not (t.is_contiguous() and o.is_contiguous()):
            raise ValueError(f"ema_update_ (triton): tensor {i} is not contiguous; use backend='torch'")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or o.dtype not in (
                torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"ema_update_ (triton): tensor {i} has unsupported dtype ({t.dtype}, {o.dtype})")
    _ema_triton_(targets, onlines, momentum)
