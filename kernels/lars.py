"""Multi-tensor LARS step: per-tensor norms in two launches (blocks, then tensors), the update in one.

One LARS step (You et al. 2017), for a tensor w with gradient g, momentum buffer buf::

    u     = g + wd·w
    trust = η·‖w‖/‖u‖   (1 where either norm is 0, or NaN)
    buf   = m·buf + trust·u
    w    -= lr·buf

and for excluded tensors (biases, normalisation parameters) ``buf = m·buf + g; w -= lr·buf``.

:func:`lars_step_reference_` is PyTorch ``_foreach`` ops (fastbyol's LARS, the CPU fallback);
:func:`lars_step_` runs, for fp32/fp64 tensors sharing one dense layout, three Triton kernels
over a block table of every tensor of the group (``launches.lars_norms_launches``,
``lars_update_launch``): the first writes each block's ``Σ w²`` and ``Σ u²``, a small second one
sums them per tensor, the third reads the sums, forms the trust ratio and updates. Memory traffic
per adapted parameter: w and g read by the norms (8 B fp32), w, g, buf read and buf, w written
by the update (20 B): 28 B, the floor of a two-pass LARS; 20 B per excluded one. No host sync:
the trust ratios never leave the device.

The block table (tensor index, offset) and the weights' and buffers' addresses are built
once per list of tensors and cached; the gradients' addresses (autograd allocates new
gradients after ``zero_grad(set_to_none=True)``) are an int64 array of one entry per tensor,
rebuilt (pinned, non-blocking copy) only when they moved.

The per-tensor sums are formed in a fixed order (blocks' partials, then one program a tensor),
not with atomics: a trust ratio is the same to the last bit on every run, as
``torch._foreach_norm``'s. The partials and the sums share one allocation and need no zeroing,
so a step is three launches for the adapted group, as with atomics and a zeroed accumulator.

After a step ``grads`` hold ``u`` (reference: computed in place) or ``g`` (kernel): unspecified.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._backend import interpreting, is_dense, use_triton
from .launches import LARS_BLOCKS, lars_norms_launches, lars_update_launch

_KERNEL_DTYPES = (torch.float32, torch.float64)
_MAX_PLANS = 64


# ----------------------------------------------------------------------------- reference

def lars_trust(params: List[torch.Tensor], grads: List[torch.Tensor], weight_decay: float,
               trust_coefficient: float) -> List[torch.Tensor]:
    """Per-tensor trust ratios ``η·‖w‖/‖u‖`` (1 where either norm is 0) as 0-d tensors, no
    host sync. Turns ``grads`` into ``u = g + wd·w`` in place (see the module docstring)."""
    if weight_decay:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    w_norm = torch.stack(torch._foreach_norm(params))
    u_norm = torch.stack(torch._foreach_norm(grads))
    trust = torch.where((w_norm > 0) & (u_norm > 0), trust_coefficient * w_norm / u_norm,
                        torch.ones_like(w_norm))
    return list(trust.to(grads[0].dtype).unbind(0))


@torch.no_grad()
def lars_step_reference_(params: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor], *,
                         lr: float, momentum: float, weight_decay: float, trust_coefficient: float,
                         adapt: bool) -> None:
    """One LARS step with ``_foreach`` ops (any dtypes and layouts); ``adapt=False``: an
    excluded group (no weight decay, no trust ratio). Same contract as :func:`lars_step_`."""
    torch._foreach_mul_(bufs, momentum)
    if adapt:
        trust = lars_trust(params, grads, weight_decay, trust_coefficient)
        torch._foreach_addcmul_(bufs, grads, trust)  # buf += trust·u, without a trust·u temporary
    else:
        torch._foreach_add_(bufs, grads)
    torch._foreach_add_(params, bufs, alpha=-lr)


# ----------------------------------------------------------------------------- Triton

def _ptr_array(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 addresses on ``device`` without a host sync (a pinned, non-blocking upload on CUDA)."""
    host = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class LarsPlan:
    """The block table of one group and its weights' and buffers' addresses, on the device."""

    def __init__(self, params: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], block: int):
        tensor, offset, first = [], [], []
        for i, p in enumerate(params):
            first.append(len(tensor))
            for off in range(0, p.numel(), block):
                tensor.append(i)
                offset.append(off)
        dev = params[0].device
        self.blk_tensor = torch.tensor(tensor, dtype=torch.int32).to(dev)
        self.blk_offset = torch.tensor(offset, dtype=torch.int64).to(dev)
        self.first_blk = torch.tensor(first, dtype=torch.int32).to(dev)  # each tensor's first block
        self.numels = torch.tensor([p.numel() for p in params], dtype=torch.int64).to(dev)
        self.w_ptrs, self.b_ptrs = _ptr_array(params, dev), _ptr_array(bufs, dev)
        self.n_blocks, self.n_tensors = len(tensor), len(params)
        self.dtype, self.block = params[0].dtype, block
        self.aligned = block * params[0].element_size() % 16 == 0 and all(
            t.data_ptr() % 16 == 0 for t in (*params, *bufs))
        self.strides = tuple(p.stride() for p in params)
        self.grads_key: Optional[tuple] = None
        self.g_ptrs: Optional[torch.Tensor] = None
        self.g_aligned = False

    def grad_pointers(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        key = tuple(map(_ptr, grads))
        if key != self.grads_key:
            self.g_ptrs = _ptr_array(grads, grads[0].device)
            self.grads_key, self.g_aligned = key, all(a % 16 == 0 for a in key)
        return self.g_ptrs


def kernel_problem(params, grads, bufs) -> Optional[str]:
    """Why the kernels cannot take this group (None when they can)."""
    if not params:
        return "no tensors"
    dtype, dev = params[0].dtype, params[0].device
    if dtype not in _KERNEL_DTYPES:
        return f"dtype {dtype} (the kernels take fp32 and fp64)"
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        if not (p.dtype == g.dtype == b.dtype == dtype and p.device == g.device == b.device == dev):
            return f"tensor {i}: weight, gradient and buffer differ in dtype or device from tensor 0"
        if not (is_dense(p) and p.stride() == g.stride() == b.stride()):
            return f"tensor {i}: weight, gradient and buffer do not share one dense layout"
    return None


_T = torch.Tensor
_ptr, _stride, _shape = _T.data_ptr, _T.stride, operator.attrgetter("shape")
_plans: Dict[tuple, LarsPlan] = {}  # by the weights and buffers
_ready: Dict[tuple, Tuple[Optional[LarsPlan], Optional[str]]] = {}  # by everything: (plan, problem)


def _block_for(dtype: torch.dtype) -> int:
    """Elements per program: ``launches.LARS_BLOCKS`` (what the compile check compiles). Under
    the interpreter a program costs milliseconds whatever its size, so blocks are 8x larger
    there: the same kernel in 8x fewer programs (tests shrink them to cover multi-block tensors)."""
    return LARS_BLOCKS[dtype] * (8 if interpreting() else 1)


def _plan(params, bufs, block: int) -> LarsPlan:
    key = (block, params[0].device, tuple(map(_ptr, params)), tuple(map(_ptr, bufs)), tuple(map(_shape, params)),
           tuple(map(_stride, params)), params[0].dtype)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _plans[key] = LarsPlan(params, bufs, block)
    return plan


def _cached(params, grads, bufs, block: Optional[int]) -> Tuple[Optional[LarsPlan], Optional[str]]:
    """(plan with the gradients' pointers current, None) or (None, why the kernels cannot).

    Keyed on every address, shape, stride and dtype the checks and tables depend on, built
    with ``map`` over C methods (the per-step host cost: the kernels themselves take
    ~0.25 ms for ResNet-50 on an H100-class GPU, so a Python loop over the tensors would
    dominate). Autograd reallocating the gradients at the same addresses (the caching
    allocator's usual steady state) is a hit; at new addresses the checks run again and
    only the gradients' pointer array is rebuilt."""
    block = block or (_block_for(params[0].dtype) if params[0].dtype in LARS_BLOCKS else 0)
    # (A buffer's layout is fixed at its address: LARS allocates it like its weight.)
    key = (block, params[0].device, tuple(map(_ptr, params)), tuple(map(_ptr, grads)), tuple(map(_ptr, bufs)),
           tuple(map(_shape, params)), tuple(map(_stride, params)), tuple(map(_stride, grads)),
           params[0].dtype, grads[0].dtype, bufs[0].dtype)
    hit = _ready.get(key)
    if hit is None:
        problem = kernel_problem(params, grads, bufs)
        plan = None
        if problem is None:
            plan = _plan(params, bufs, block)
            plan.grad_pointers(grads)
        if len(_ready) >= _MAX_PLANS:
            _ready.clear()
        hit = _ready[key] = (plan, problem)
    elif hit[0] is not None and hit[0].grads_key != key[3]:
        hit[0].grad_pointers(grads)  # the plan is shared with another gradient list: point it here
    return hit


def _get_kernels():
    from . import _triton_lars  # triton is imported only here

    return _triton_lars


def _lars_triton_(plan: LarsPlan, lr, momentum, weight_decay, trust_coefficient, adapt):
    if not plan.n_blocks:  # every tensor empty
        return
    g_ptrs = plan.g_ptrs
    aligned = plan.aligned and plan.g_aligned
    k = _get_kernels()
    if adapt:
        norms, sq = lars_norms_launches(plan, g_ptrs, weight_decay, aligned)
        for launch in norms:
            launch.run(getattr(k, launch.kernel))
    else:
        sq = plan.numels  # unused by the excluded update: any tensor will do
    lars_update_launch(plan, g_ptrs, sq, lr, momentum, weight_decay, trust_coefficient, adapt,
                       aligned).run(k.lars_update_kernel)


@torch.no_grad()
def lars_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], *,
               lr: float, momentum: float, weight_decay: float, trust_coefficient: float, adapt: bool,
               backend: str = "auto") -> None:
    """One LARS step of one parameter group, in place on ``params`` and ``bufs``.

    Args:
        params, grads, bufs: equal-length lists; a tensor's gradient and momentum buffer have
            its shape. The kernels take fp32 or fp64 groups whose three tensors share one dense
            layout (contiguous, channels_last, ...); others go to the reference (``auto``).
        lr, momentum, weight_decay, trust_coefficient: Python floats.
        adapt: weight decay and trust ratio (weights); False for an excluded group.
        backend: ``auto`` | ``triton`` | ``torch`` (see the package docstring).

    Raises:
        ValueError: mismatched lengths; under ``triton``, a group the kernels cannot take.
        RuntimeError: ``backend="triton"`` where the kernels cannot run.

    Examples:
        >>> w, g, b = [torch.ones(3)], [torch.ones(3)], [torch.zeros(3)]
        >>> lars_step_(w, g, b, lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=1.0, adapt=True)
        >>> w[0]
        tensor([0.9000, 0.9000, 0.9000])
    """
    params, grads, bufs = list(params), list(grads), list(bufs)
    if not len(params) == len(grads) == len(bufs):
        raise ValueError(f"lars_step_: {len(params)} params, {len(grads)} grads, {len(bufs)} buffers")
    if not params:
        return
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
    if use_triton(backend, params[:1]):
        plan, problem = _cached(params, grads, bufs, None)
        if problem is None and not all(type(v) in (int, float) for v in hyper.values()):
            problem = "lr, momentum, weight_decay, trust_coefficient must be Python numbers"
        if problem is None:
            return _lars_triton_(plan, adapt=adapt, **{k: float(v) for k, v in hyper.items()})
        if backend == "triton":
            raise ValueError(f"lars_step_ (triton): {problem}")
    lars_step_reference_(params, grads, bufs, adapt=adapt, **hyper)
