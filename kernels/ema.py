"""One-pass multi-tensor EMA: ``target ← m·target + (1 − m)·online`` over whole lists.

The kernel walks a block table over all tensors of a (target dtype, online dtype) group:
each entry is one block's start address in the target and in the online tensor, plus its
length. One launch covers any number of tensors and every element is read once and written
once (12 bytes per fp32 parameter, the floor). The tables are built once per list of
tensors and cached under the tensors' addresses, sizes and dtypes, so a training step's
update costs building that key, a dict lookup and one launch per group on the host.
``momentum`` may be a 0-d device tensor, read inside the kernel: no host sync, and a CUDA
graph captured around the update sees each new value.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Sequence, Tuple, Union

import torch

from ._backend import BACKENDS, use_triton
from .launches import EMA_BLOCK, ema_launch

Momentum = Union[float, torch.Tensor]
BLOCK = EMA_BLOCK
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_PLANS = 64  # distinct parameter lists cached; more than any real training script uses


# ----------------------------------------------------------------------------- reference

@torch.no_grad()
def ema_update_reference_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor],
                          momentum: Momentum) -> None:
    """Plain PyTorch EMA with ``_foreach`` ops per dtype group (the CPU fallback).

    Same contract as :func:`ema_update_`; any floating dtypes and layouts.
    """
    if targets:
        momentum = _momentum_on(momentum, targets[0].device)
    for (tdt, _), idx in _dtype_groups(targets, onlines).items():
        ts = [targets[i] for i in idx]
        if tdt in (torch.float32, torch.float64):
            os_ = [onlines[i].to(tdt) for i in idx]  # a no-op for same dtypes, exact upcast otherwise
            if not isinstance(momentum, torch.Tensor):
                torch._foreach_lerp_(ts, os_, 1.0 - momentum)  # one pass (timm's ModelEmaV3)
            else:  # the Tensor overloads keep m on the device (lerp would call .item())
                torch._foreach_mul_(ts, momentum)
                torch._foreach_add_(ts, torch._foreach_mul(os_, 1 - momentum))
        else:  # low-precision targets: compute in fp32 like the kernel, round once
            for i in idx:
                t = targets[i]
                t.copy_(momentum * t.float() + (1 - momentum) * onlines[i].float())


def _dtype_groups(targets, onlines) -> Dict[Tuple[torch.dtype, torch.dtype], List[int]]:
    groups: Dict[Tuple[torch.dtype, torch.dtype], List[int]] = {}
    for i, (t, o) in enumerate(zip(targets, onlines)):
        groups.setdefault((t.dtype, o.dtype), []).append(i)
    return groups


# ----------------------------------------------------------------------------- Triton

def _get_kernel():
    from ._triton_ema import ema_kernel  # triton is imported only here

    return ema_kernel


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements from ``data_ptr`` in some
    dimension order (contiguous, channels_last, a transpose, ...): then memory order works."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _Plan:
    """Block table of one (target dtype, online dtype, alignment) group, on the device."""

    def __init__(self, ts: List[torch.Tensor], os_: List[torch.Tensor], aligned: bool, block: int):
        t_addr, o_addr, lens = [], [], []
        te, oe = ts[0].element_size(), os_[0].element_size()
        for t, o in zip(ts, os_):
            for off in range(0, t.numel(), block):
                t_addr.append(t.data_ptr() + off * te)
                o_addr.append(o.data_ptr() + off * oe)
                lens.append(min(block, t.numel() - off))
        dev = ts[0].device
        self.t_blocks = torch.tensor(t_addr, dtype=torch.int64, device=dev)
        self.o_blocks = torch.tensor(o_addr, dtype=torch.int64, device=dev)
        self.blk_len = torch.tensor(lens, dtype=torch.int32, device=dev)
        self.n_blocks = len(lens)
        self.t_dtype, self.o_dtype, self.aligned, self.block = ts[0].dtype, os_[0].dtype, aligned, block


def _same_layout(t: torch.Tensor, o: torch.Tensor) -> bool:
    return all(a == b for s, a, b in zip(t.shape, t.stride(), o.stride()) if s != 1)


class _Plans:
    """What one list of tensors needs: kernel launches, and the indices left to the reference."""

    def __init__(self, kernel: List[_Plan], rest: List[int]):
        self.kernel, self.rest = kernel, rest


def _build_plans(targets, onlines, block: int, strict: bool) -> _Plans:
    _validate(targets, onlines)
    dev = targets[0].device
    groups: Dict[tuple, List[int]] = {}
    rest: List[int] = []
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if t.device != dev:
            raise ValueError(f"ema_update_: tensor {i} is on {t.device}, tensor 0 on {dev}")
        if t.dtype not in _KERNEL_DTYPES or o.dtype not in _KERNEL_DTYPES:
            if strict:
                raise ValueError(f"ema_update_ (triton): tensor {i} has dtypes ({t.dtype}, {o.dtype}); the kernel "
                                 f"takes fp32, bf16, fp16 (use backend='auto' or 'torch')")
            rest.append(i)
        elif t.numel() == 0:
            continue
        elif not (_is_dense(t) and _is_dense(o) and _same_layout(t, o)):
            # Elements are paired by memory position, right only for one dense layout
            # (contiguous, both channels_last, ...). Other pairs are rare: the reference
            # takes them, one extra foreach pass whatever their number.
            rest.append(i)
        else:
            # Block starts stay 16-byte aligned when the tensors' starts are (BLOCK·element
            # size is a multiple of 16 for the default block): the kernel then vectorises.
            aligned = (t.data_ptr() % 16 == 0 and o.data_ptr() % 16 == 0
                       and block * t.element_size() % 16 == 0 and block * o.element_size() % 16 == 0)
            groups.setdefault((t.dtype, o.dtype, aligned), []).append(i)
    kernel = [_Plan([targets[i] for i in idx], [onlines[i] for i in idx], aligned, block)
              for (_, _, aligned), idx in groups.items()]
    return _Plans(kernel, rest)


_plans: Dict[tuple, _Plans] = {}
_ptr, _numel, _dtype = torch.Tensor.data_ptr, torch.Tensor.numel, operator.attrgetter("dtype")


def _cached_plans(targets, onlines, block: int, strict: bool) -> _Plans:
    # The tables hold raw addresses, so the key is everything they depend on. Built with
    # map over C methods: ~0.2 µs a tensor, the only per-call host work besides the launch.
    key = (block, strict, tuple(map(_ptr, targets)), tuple(map(_ptr, onlines)), tuple(map(_numel, targets)),
           tuple(map(_dtype, targets)), tuple(map(_dtype, onlines)))
    plans = _plans.get(key)
    if plans is None:
        plans = _build_plans(targets, onlines, block, strict)
        if len(_plans) >= _MAX_PLANS:  # e.g. a script building many models: forget the old ones
            _plans.clear()
        _plans[key] = plans
    return plans


def _ema_triton_(targets, onlines, momentum: Momentum, strict: bool = True, block: int = BLOCK) -> None:
    plans = _cached_plans(targets, onlines, block, strict)
    if plans.kernel:
        kernel = _get_kernel()
        for plan in plans.kernel:
            ema_launch(plan.t_blocks, plan.o_blocks, plan.blk_len, plan.t_dtype, plan.o_dtype, plan.aligned,
                       plan.block, momentum).run(kernel)
    if plans.rest:
        ema_update_reference_([targets[i] for i in plans.rest], [onlines[i] for i in plans.rest], momentum)


def _momentum_on(momentum: Momentum, device: torch.device) -> Momentum:
    """A tensor momentum as one element on ``device`` (a copy only if it lives elsewhere)."""
    if not isinstance(momentum, torch.Tensor):
        return momentum
    if momentum.numel() != 1:
        raise ValueError(f"ema_update_: momentum must be a float or a 1-element tensor, got shape "
                         f"{tuple(momentum.shape)}")
    if momentum.device != device:
        momentum = momentum.to(device, non_blocking=True)
    return momentum.reshape(())


# ----------------------------------------------------------------------------- public API

def _validate(targets, onlines) -> None:
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
        targets: tensors updated in place (fp32, bf16 or fp16 for Triton), any mix of shapes.
        onlines: same shapes; their dtype may differ from the target's (e.g. bf16 online, fp32
            target). Computed in fp32, rounded once to the target's dtype.
        momentum: a Python float or a 1-element tensor, ideally on the tensors' device (read
            on device: no host sync, CUDA-graph capturable). For finite values, ``1`` leaves
            the targets bit-identical and ``0`` copies the onlines exactly.
        backend: ``auto`` | ``triton`` | ``torch`` (see the package docstring).

    Triton: one launch per (target dtype, online dtype) group (two if some addresses are not
    16-byte aligned), each element read and written once, in memory order; so a target and
    its online must share one dense layout (contiguous, both channels_last, ...). Pairs that
    do not (rare), and under ``auto`` dtypes the kernel lacks (fp64), go to the reference in
    one extra ``_foreach`` pass. The block table is cached per list of tensors (keyed on
    their addresses, sizes and dtypes): call once before capturing a CUDA graph.

    Raises:
        ValueError: mismatched lengths, shapes, devices; non-floating tensors; a momentum tensor
            of several elements; an unknown backend; under ``triton``, dtypes other than
            fp32/bf16/fp16.
        RuntimeError: ``backend="triton"`` where the kernel cannot run.

    Examples:
        >>> online, target = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
        >>> ema_update_(list(target.parameters()), list(online.parameters()), 0.996)
        >>> ema_update_(list(target.parameters()), list(online.parameters()), 0.0)  # copy
        >>> torch.equal(target.weight, online.weight)
        True
    """
    targets = targets if isinstance(targets, (list, tuple)) else list(targets)
    onlines = onlines if isinstance(onlines, (list, tuple)) else list(onlines)
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update_: {len(targets)} targets but {len(onlines)} onlines")
    if not targets:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return
    momentum = _momentum_on(momentum, targets[0].device)
    # The backend follows tensor 0's device; a plan is built only after every tensor is checked.
    if use_triton(backend, targets[:1]):
        _ema_triton_(targets, onlines, momentum, strict=backend == "triton")
    else:
        _validate(targets, onlines)
        ema_update_reference_(targets, onlines, momentum)
