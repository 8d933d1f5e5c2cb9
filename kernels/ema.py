"""One-pass multi-tensor EMA: ``target ← m·target + (1 − m)·online`` over whole lists.

The kernel walks a block table over all tensors of a (target dtype, online dtype) group:
each entry is one block's start address in the target and in the online tensor, plus its
length. One launch covers any number of tensors and every element is read once and written
once (12 bytes per fp32 parameter, the floor). The tables are built once per list of
tensors and cached under everything the element pairing depends on (addresses, shapes,
strides, dtypes, device), so a training step's update costs building that key, a dict
lookup and one launch per group on the host.

Exactness: the update is torch.lerp's formula with weight ``1 − m`` (what ``AveragedModel``
and timm's ``ModelEmaV3`` run), in fp32, rounded once to the target's dtype. For a float
momentum ``1 − m`` is formed in double on the host and both ``m`` and ``1 − m`` reach the
kernel as their fp32 values; a 0-d tensor momentum (fp32 or fp64) is read on the device
and ``1 − m`` formed there in fp64. Either way a τ near 1 keeps its small weight exactly
(fp32 ``1 − m`` would be quantised to multiples of 6e-8), so the result equals the peers'
to fp32 rounding whatever the momentum.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Sequence, Tuple, Union

import torch

from ._backend import BACKENDS, is_dense, use_triton
from .launches import EMA_BLOCK, ema_launch

Momentum = Union[float, torch.Tensor]
BLOCK = EMA_BLOCK  # elements per program (launches.py: with the warps, and every launch)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_PLANS = 64  # distinct parameter lists cached; more than any real training script uses


# ----------------------------------------------------------------------------- momentum

def _check_momentum(momentum: Momentum, device: torch.device) -> Momentum:
    """A float momentum checked to lie in [0, 1]; a tensor as one floating element on ``device``.

    A CPU tensor's value is checked too (reading it costs no sync). A CUDA tensor's value is
    not read on the host (that would sync every step): the kernel, and the reference, leave
    the targets untouched when it is outside [0, 1] or NaN.
    """
    if type(momentum) is float and 0.0 <= momentum <= 1.0:  # the common case, first
        return momentum
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"ema_update_: momentum must be a float or a 1-element floating tensor, got "
                             f"shape {tuple(momentum.shape)} {momentum.dtype}")
        if momentum.device.type == "cpu":
            _check_value(float(momentum))
        if momentum.device != device:
            momentum = momentum.to(device, non_blocking=True)
        return momentum.reshape(())
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) and not hasattr(momentum, "__float__"):
        raise ValueError(f"ema_update_: momentum must be a float or a 1-element tensor, got {type(momentum).__name__}")
    momentum = float(momentum)
    _check_value(momentum)
    return momentum


def _check_value(m: float) -> None:
    if not 0.0 <= m <= 1.0:  # NaN fails too
        raise ValueError(f"ema_update_: momentum must be in [0, 1], got {m}")


def _group_seed(seed: int, group: int) -> int:
    """One stochastic-rounding stream per launch (group) of one call; fits the kernel's i32."""
    return (seed * 1_000_003 + group * 0x9E3779B1) % (1 << 31)


# ----------------------------------------------------------------------------- reference

@torch.no_grad()
def ema_update_reference_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor],
                          momentum: Momentum, *, stochastic_rounding: bool = False, seed: int = 0) -> None:
    """Plain PyTorch EMA with ``_foreach`` ops per dtype group (the CPU fallback).

    Same contract as :func:`ema_update_`; any floating dtypes and layouts. Stochastic rounding
    draws its bits from a ``torch.Generator`` seeded with ``seed`` (other bits than the
    kernel's, the same distribution).
    """
    targets, onlines = list(targets), list(onlines)
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update_: {len(targets)} targets but {len(onlines)} onlines")
    if targets:
        _validate(targets, onlines)
        _reference_(targets, onlines, _check_momentum(momentum, targets[0].device),
                    _dtype_groups(targets, onlines), stochastic_rounding, seed)


def _reference_(targets, onlines, momentum: Momentum, groups, stochastic: bool, seed: int) -> None:
    """The reference on validated tensors, ``groups`` as from :func:`_dtype_groups`."""
    if isinstance(momentum, torch.Tensor) and momentum.device.type == "cpu":
        momentum = float(momentum)  # exact (fp64 → double), and the float path is one lerp pass
    if isinstance(momentum, torch.Tensor):
        # On device: an invalid value becomes m = 1 (a no-op), as the kernel; 1 − m in fp64.
        m64 = momentum.double()
        m64 = torch.where((m64 >= 0) & (m64 <= 1), m64, torch.ones_like(m64))
        w64 = 1 - m64
    whole = len(groups) == 1
    for g, ((tdt, odt), idx) in enumerate(groups.items()):
        ts, os_ = (targets, onlines) if whole else ([targets[i] for i in idx], [onlines[i] for i in idx])
        sr = stochastic and tdt == torch.bfloat16
        if tdt == odt and not sr and not isinstance(momentum, torch.Tensor):
            # One pass (timm's ModelEmaV3, AveragedModel); low-precision lerp computes in fp32.
            torch._foreach_lerp_(ts, os_, 1.0 - momentum)
            continue
        # fp32 maths (fp64 when a side is fp64), rounded once to the target's dtype.
        cdt = torch.promote_types(torch.promote_types(tdt, odt), torch.float32)
        xs = ts if tdt == cdt else [t.to(cdt) for t in ts]
        ys = os_ if odt == cdt else [o.to(cdt) for o in os_]
        if isinstance(momentum, torch.Tensor):
            torch._foreach_mul_(xs, m64.to(cdt))
            torch._foreach_add_(xs, torch._foreach_mul(ys, w64.to(cdt)))
        else:
            torch._foreach_lerp_(xs, ys, 1.0 - momentum)
        if sr:
            gen = torch.Generator(device=xs[0].device).manual_seed(_group_seed(seed, g))
            xs = [_stochastic_round_bf16(x, gen) for x in xs]
        if xs is not ts:
            torch._foreach_copy_(ts, xs)


def _stochastic_round_bf16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """fp32 → bf16-representable fp32: add 16 random bits below the bf16 mantissa, truncate
    (timm's ``_lerp_stochastic_round_bf16_``); inf and NaN are left to plain rounding."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=gen)
    rounded = (x.view(torch.int32) + noise).bitwise_and_(-(1 << 16)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def _dtype_groups(targets, onlines) -> Dict[Tuple[torch.dtype, torch.dtype], List[int]]:
    groups: Dict[Tuple[torch.dtype, torch.dtype], List[int]] = {}
    for i, (t, o) in enumerate(zip(targets, onlines)):
        groups.setdefault((t.dtype, o.dtype), []).append(i)
    return groups


# ----------------------------------------------------------------------------- Triton

def _get_kernel():
    from ._triton_ema import ema_kernel  # triton is imported only here

    return ema_kernel


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
    """What one list of tensors needs: kernel launches, and the indices left to the reference
    (with their dtype groups)."""

    def __init__(self, kernel: List[_Plan], rest: List[int], targets, onlines):
        self.kernel, self.rest = kernel, rest
        self.rest_groups = _dtype_groups([targets[i] for i in rest], [onlines[i] for i in rest])


def _build_plans(targets, onlines, block: int, strict: bool, use_kernel: bool) -> _Plans:
    _validate(targets, onlines)
    if not use_kernel:
        return _Plans([], list(range(len(targets))), targets, onlines)
    groups: Dict[tuple, List[int]] = {}
    rest: List[int] = []
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if t.dtype not in _KERNEL_DTYPES or o.dtype not in _KERNEL_DTYPES:
            if strict:
                raise ValueError(f"ema_update_ (triton): tensor {i} has dtypes ({t.dtype}, {o.dtype}); the kernel "
                                 f"takes fp32, bf16, fp16 (use backend='auto' or 'torch')")
            rest.append(i)
        elif t.numel() == 0:
            continue
        elif not (is_dense(t) and is_dense(o) and _same_layout(t, o)):
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
    return _Plans(kernel, rest, targets, onlines)


_plans: Dict[tuple, _Plans] = {}
_T = torch.Tensor
_ptr, _stride, _shape, _dtype = _T.data_ptr, _T.stride, operator.attrgetter("shape"), operator.attrgetter("dtype")


def plan_key(targets, onlines) -> tuple:
    """What the element pairing depends on: addresses, shapes, strides, dtypes, device.

    The address is the storage's plus the storage offset, so it carries the offset; under
    CUDA's unified addressing an address also names its device (tensor 0's is keyed too; a
    plan is built only after every tensor is checked to share it). Built with map over C
    methods: well under a microsecond a tensor, the only per-call host work besides the launch.
    """
    return (targets[0].device, tuple(map(_ptr, targets)), tuple(map(_ptr, onlines)),
            tuple(map(_shape, targets)), tuple(map(_shape, onlines)),
            tuple(map(_stride, targets)), tuple(map(_stride, onlines)),
            tuple(map(_dtype, targets)), tuple(map(_dtype, onlines)))


def _reference_key(targets, onlines) -> tuple:
    """The reference pairs tensors as they are at each call, so its cache holds only the checks
    and dtype groups: keyed on the tensor objects and dtypes (a tensor re-shaped in place
    later meets torch's own error). Cheaper than :func:`plan_key`, for CPU training loops."""
    return tuple(map(id, targets)), tuple(map(id, onlines)), tuple(map(_dtype, targets)), tuple(map(_dtype, onlines))


def _cached_plans(targets, onlines, block: int, strict: bool, use_kernel: bool) -> _Plans:
    key = (block, strict, plan_key(targets, onlines)) if use_kernel else _reference_key(targets, onlines)
    plans = _plans.get(key)
    if plans is None:
        plans = _build_plans(targets, onlines, block, strict, use_kernel)
        if len(_plans) >= _MAX_PLANS:  # e.g. a script building many models: forget the old ones
            _plans.clear()
        _plans[key] = plans
    return plans


def _ema_(targets, onlines, momentum: Momentum, use_kernel: bool, strict: bool = True, block: int = BLOCK,
          stochastic_rounding: bool = False, seed: int = 0) -> None:
    plans = _cached_plans(targets, onlines, block, strict, use_kernel)
    if plans.kernel:
        kernel = _get_kernel()
        for g, plan in enumerate(plans.kernel):
            ema_launch(plan, momentum, stochastic_rounding, _group_seed(seed, g)).run(kernel)
    if plans.rest:
        _reference_([targets[i] for i in plans.rest], [onlines[i] for i in plans.rest], momentum,
                    plans.rest_groups, stochastic_rounding, seed)


# ----------------------------------------------------------------------------- public API

def _validate(targets, onlines) -> None:
    """Every check that needs no device data, before anything is written."""
    dev = targets[0].device
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if t.shape != o.shape:
            raise ValueError(f"ema_update_: tensor {i}: target shape {tuple(t.shape)} != online {tuple(o.shape)}")
        if t.device != o.device or t.device != dev:
            raise ValueError(f"ema_update_: tensor {i}: target on {t.device}, online on {o.device}, tensor 0 on {dev}")
        if not (t.is_floating_point() and o.is_floating_point()):
            raise ValueError(f"ema_update_: tensor {i} is not floating point ({t.dtype}, {o.dtype})")
        if t.numel() and t.data_ptr() == o.data_ptr():
            raise ValueError(f"ema_update_: tensor {i}: the target is the online tensor itself (same memory); "
                             f"the target must be a copy (e.g. copy.deepcopy of the online module)")


def ema_update_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: Momentum, *,
                backend: str = "auto", stochastic_rounding: bool = False, seed: int = 0) -> None:
    """In place, for every pair: ``target ← m·target + (1 − m)·online``.

    Args:
        targets: tensors updated in place (fp32, bf16 or fp16 for Triton), any mix of shapes.
        onlines: same shapes; their dtype may differ from the target's (e.g. bf16 online, fp32
            target). Computed in fp32 (torch.lerp's formula), rounded once to the target's dtype.
        momentum: a Python float in [0, 1] (``1 − m`` formed in double), or a 1-element fp32 or
            fp64 tensor, ideally on the tensors' device (read on device, ``1 − m`` formed in
            fp64 there: no host sync, CUDA-graph capturable). ``1`` leaves the targets
            bit-identical and ``0`` copies the onlines exactly. A CPU tensor's value is checked
            like a float; a CUDA tensor's value is not read on the host: outside [0, 1] or NaN,
            the update leaves the targets untouched.
        backend: ``auto`` | ``triton`` | ``torch`` (see the package docstring).
        stochastic_rounding: bf16 targets round stochastically (as timm's ``ModelEmaV3``), so
            updates below bf16 resolution accumulate in expectation; other dtypes round to nearest.
        seed: the rounding stream (vary it per call, e.g. the step); the same seed rounds
            the same way on every rank.

    Triton: one launch per (target dtype, online dtype) group (two if some addresses are not
    16-byte aligned), each element read and written once, in memory order; so a target and
    its online must share one dense layout (contiguous, both channels_last, ...). Pairs that
    do not (rare), and under ``auto`` dtypes the kernel lacks (fp64), go to the reference in
    one extra ``_foreach`` pass. The block table is cached per list of tensors (keyed on
    their addresses, shapes, strides, dtypes and device): call once before capturing a CUDA graph.

    Raises:
        ValueError: mismatched lengths, shapes, devices; non-floating tensors; a target that is
            its online; a float momentum outside [0, 1] or NaN; a momentum tensor of several
            elements; an unknown backend; under ``triton``, dtypes other than fp32/bf16/fp16.
            Everything is checked before any tensor is written.
        RuntimeError: ``backend="triton"`` where the kernel cannot run.

    Examples:
        >>> online, target = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
        >>> ema_update_(list(target.parameters()), list(online.parameters()), 0.996)
        >>> ema_update_(list(target.parameters()), list(online.parameters()), 0.0)  # copy
        >>> torch.equal(target.weight, online.weight)
        True
    """
    if torch.is_grad_enabled():  # callers in no_grad (ModuleEMA, the drop-ins) skip its ~2 µs
        with torch.no_grad():
            return ema_update_(targets, onlines, momentum, backend=backend,
                               stochastic_rounding=stochastic_rounding, seed=seed)
    targets = targets if isinstance(targets, (list, tuple)) else list(targets)
    onlines = onlines if isinstance(onlines, (list, tuple)) else list(onlines)
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update_: {len(targets)} targets but {len(onlines)} onlines")
    if not targets:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return
    momentum = _check_momentum(momentum, targets[0].device)
    # The backend follows tensor 0's device; a plan is built only after every tensor is checked.
    use_kernel = use_triton(backend, targets[:1])
    _ema_(targets, onlines, momentum, use_kernel, strict=backend == "triton",
          stochastic_rounding=stochastic_rounding, seed=seed)
