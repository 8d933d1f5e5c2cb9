"""What each aten op and each Triton launch of a step would cost on a GPU: launches, bytes, FLOPs.

:class:`CostCounter` is a ``TorchDispatchMode``: it sees every aten op below autograd (forward,
backward and optimizer alike) with its arguments' shapes, strides and dtypes, and records one
:class:`OpCost` per op under the current stage. It runs over ``meta`` tensors, so no arithmetic
happens. The rules, per op:

* views, allocations and metadata ops (``view``, ``expand``, ``empty``, ``detach``...): nothing;
* any other op: one launch, reading every tensor argument once (only the elements it spans:
  a broadcast operand of stride 0 counts once) and writing every output (an in-place op its
  mutated argument). That is the traffic of a kernel with perfect on-chip reuse: a convolution
  or matmul reads its operands once, which real kernels approach for these shapes;
* BatchNorm, training: forward reads the input twice (statistics, then normalise) and writes
  the output, ``(2 + 1)·x``; backward reads input and upstream gradient twice (the two
  reductions, then the input gradient) and writes the input gradient, ``2·(x + dy) + dx``.
  This is cuDNN's two-pass scheme: 6 and 10 B/element in bf16, the floors of the issue;
* ``_foreach_*`` ops: CUDA's multi-tensor apply, one launch per chunk of tensors, when all
  lists agree in shape and dtype (its fast path); otherwise one launch per tensor (the slow path,
  e.g. a list of 0-d tensors as a per-tensor scalar operand);
* convolutions and matmuls: FLOPs ``2·M·N·K`` (a convolution's backward one GEMM per gradient
  it returns, one launch each); element-wise ops one FLOP per output element;
* a CPU tensor copied to the device: a host→device transfer, not a kernel (counted apart);
  an op on CPU tensors alone: host work, not counted;
* Triton launches (:func:`launch_cost`): from their :class:`fastbyol_kernels.launches.Launch`
  description, the tensors each kernel reads and writes.

The device side is modelled as CUDA (what the meta tensors stand for); the roofline times are
:mod:`fastbyol.cost.roofline`'s.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
from fastbyol_kernels.launches import blur_reads_and_flops
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops that launch nothing and move nothing on a GPU (allocation, metadata, aliasing).
FREE_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "_local_scalar_dense", "set_", "resize_", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "_to_copy_noop",
}
CONV_OPS = {"convolution", "_convolution", "cudnn_convolution", "convolution_overrideable"}
CREATE_OPS = {"zeros", "ones", "full", "scalar_tensor", "arange", "zeros_like", "ones_like", "full_like", "fill_",
              "zero_", "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "normal_", "uniform_"}
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}
BN_FWD_OPS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
              "_batch_norm_with_update", "_batch_norm_no_update", "cudnn_batch_norm"}
BN_BWD_OPS = {"native_batch_norm_backward", "batch_norm_backward", "cudnn_batch_norm_backward"}
# CUDA multi-tensor apply (ATen/native/cuda/MultiTensorApply.cuh): tensors and 64K-element
# chunks per launch, by the number of tensor lists.
MTA_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
MTA_MAX_BLOCKS = 320
MTA_CHUNK = 65536


@dataclass
class OpCost:
    """One op or launch: ``kind`` is ``memory`` (bandwidth-bound), ``conv``, ``matmul``,
    ``transfer`` (host→device) or ``collective``."""

    op: str
    launches: int = 1
    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0
    kind: str = "memory"
    dtype: str = ""

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def spanned_bytes(t: torch.Tensor) -> int:
    """Bytes an op reads of ``t``: every element it spans once (a stride-0 dimension once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(x) -> List[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _name(func) -> str:
    return func._schema.name.split("::")[-1]


def _mutated(func, args, kwargs) -> List[torch.Tensor]:
    """The tensor arguments ``func`` writes in place (its schema's ``Tensor(a!)``)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) else kwargs.get(a.name)
            out += _tensors(v)
    return out


def conv_flops(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, groups: int) -> int:
    """``2 · (output elements) · (input channels per group) · (kernel area)``."""
    return 2 * y.numel() * (x.shape[1] // groups) * math.prod(w.shape[2:])


def matmul_flops(name: str, args, out: torch.Tensor) -> int:
    a = args[1] if name in ("addmm", "baddbmm", "_addmm_activation") else args[0]
    return 2 * out.numel() * a.shape[-1]


def _foreach_launches(lists: List[List[torch.Tensor]]) -> int:
    """Launches of a CUDA ``_foreach_*`` op over these tensor lists (see the module doc)."""
    first = lists[0]
    if not first:
        return 0
    fast = all(len(lst) == len(first) and all(t.shape == f.shape and t.dtype == f.dtype and t.stride() == f.stride()
                                              for t, f in zip(lst, first)) for lst in lists)
    if not fast:
        return len(first)
    depth = min(len(lists), 5)
    chunks = sum(max(1, math.ceil(t.numel() / MTA_CHUNK)) for t in first)
    return max(math.ceil(len(first) / MTA_MAX_TENSORS[depth]), math.ceil(chunks / MTA_MAX_BLOCKS))


def op_cost(func, args, kwargs, out) -> Optional[OpCost]:
    """The GPU cost of one aten op (None: free). ``out`` is what the op returned."""
    name = _name(func)
    if name in FREE_OPS or getattr(func, "is_view", False):
        return None
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    if all(t.device.type == "cpu" for t in ins + outs):  # host work (e.g. on a remembered table): no kernel
        return None
    if name == "_to_copy" and ins and ins[0].device.type == "cpu" and outs and outs[0].device.type != "cpu":
        return OpCost(name, launches=0, bytes_read=spanned_bytes(ins[0]), kind="transfer")
    dtype = str(outs[0].dtype).replace("torch.", "") if outs else (str(ins[0].dtype).replace("torch.", "") if ins else "")
    if name.startswith("_foreach_"):
        lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple)) and a
                 and isinstance(a[0], torch.Tensor)]
        mutated = _mutated(func, args, kwargs)
        read = sum(spanned_bytes(t) for lst in lists for t in lst)
        if name in ("_foreach_zero_",):
            read = 0
        written = sum(spanned_bytes(t) for t in (mutated or outs))
        elems = sum(t.numel() for t in (mutated or outs))
        return OpCost(name, _foreach_launches(lists), read, written, elems, dtype=dtype)
    if name in BN_FWD_OPS:
        x, y = args[0], outs[0]
        training = args[5] if name in ("native_batch_norm", "cudnn_batch_norm") else name in (
            "_native_batch_norm_legit", "_batch_norm_with_update")
        passes = 2 if training else 1
        return OpCost(name, 1, passes * spanned_bytes(x), spanned_bytes(y), 4 * x.numel(), dtype=dtype)
    if name in BN_BWD_OPS:
        dy, x = args[0], args[1]
        dx = outs[0] if outs and isinstance(out, (tuple, list)) and out[0] is not None else None
        written = spanned_bytes(dx) if dx is not None else 0
        return OpCost(name, 1, 2 * (spanned_bytes(x) + spanned_bytes(dy)), written, 8 * x.numel(), dtype=dtype)
    mutated = _mutated(func, args, kwargs)
    written_ts = mutated or outs
    if name in CREATE_OPS:  # writes only (a *_like input gives its shape, it is not read)
        read_ts = []
    elif name == "copy_":  # the destination is overwritten, not read
        read_ts = _tensors(args[1])
    else:
        read_ts = ins
    cost = OpCost(name, 1, sum(spanned_bytes(t) for t in read_ts), sum(spanned_bytes(t) for t in written_ts),
                  sum(t.numel() for t in written_ts), dtype=dtype)
    if name in CONV_OPS:
        x, w = args[0], args[1]
        cost.kind, cost.flops = "conv", conv_flops(x, w, outs[0], args[8] if len(args) > 8 else 1)
    elif name == "convolution_backward":
        dy, x, w = args[0], args[1], args[2]
        mask = args[10] if len(args) > 10 else [True, True, True]
        one = conv_flops(x, w, dy, args[9] if len(args) > 9 else 1)
        cost.kind = "conv"
        cost.flops = one * (int(bool(mask[0])) + int(bool(mask[1])))
        cost.launches = max(1, int(bool(mask[0])) + int(bool(mask[1])))
        cost.bytes_written = sum(spanned_bytes(t) for t in outs)
    elif name in MATMUL_OPS:
        cost.kind, cost.flops = "matmul", matmul_flops(name, args, outs[0])
    return cost


@dataclass
class Record:
    stage: str
    cost: OpCost


@dataclass
class CostCounter(TorchDispatchMode):
    """Records the cost of every aten op run under it (and of :meth:`add`-ed launches) per stage.

    ``stage`` is the current stage's name (see :meth:`scope`); ``recording`` off still lets the
    counter remember small host→device constants (a warm-up step), without recording.

    Examples:
        >>> counter = CostCounter()
        >>> with counter, counter.scope("forward"):
        ...     _ = torch.empty(4, 4, device="meta") + 1
        >>> counter.records[0].cost.bytes
        128
    """

    records: List[Record] = field(default_factory=list)
    stage: str = "other"
    recording: bool = True
    _constants: Dict[int, tuple] = field(default_factory=dict)

    def __post_init__(self):
        super().__init__()

    @contextlib.contextmanager
    def scope(self, stage: str) -> Iterator[None]:
        """Attribute what runs inside to ``stage`` (nested scopes: the innermost wins)."""
        previous, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = previous

    def push(self, stage: str):
        """For hooks that open a scope in one callback and close it in another: returns the closer."""
        previous, self.stage = self.stage, stage

        def close(*_):
            self.stage = previous
        return close

    def add(self, cost: OpCost, stage: Optional[str] = None) -> None:
        if self.recording:
            self.records.append(Record(stage or self.stage, cost))

    def remember(self, device_tensor: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the host values of a small device tensor (a table built from a Python list)."""
        self._constants[id(device_tensor)] = (weakref.ref(device_tensor), values)

    def constant(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """The host values of a device tensor that was copied from a small CPU tensor, if known."""
        hit = self._constants.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (_name(func) == "_to_copy" and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
                and isinstance(out, torch.Tensor) and out.device.type == "meta" and out.numel() <= 1 << 20):
            self.remember(out, args[0].clone())
        if self.recording:
            cost = op_cost(func, args, kwargs, out)
            if cost is not None:
                self.records.append(Record(self.stage, cost))
        return out


# ----------------------------------------------------------------------------- Triton launches

def _tensor_bytes(t) -> int:
    return spanned_bytes(t) if isinstance(t, torch.Tensor) else 0


def launch_cost(launch, counter: Optional[CostCounter] = None) -> OpCost:
    """The cost of one :class:`fastbyol_kernels.launches.Launch`, from the tensors its kernel
    reads and writes (the kernels' docstrings): the loss reads each input row once per pass and
    writes its six sums or the gradients; the EMA reads target and online and writes the target,
    over the elements of its block table (whose lengths ``counter`` remembers from the host)."""
    a, c = launch.args, launch.constexprs
    if launch.kernel == "loss_fwd":
        ins = [a["p_ptr"], a["z_ptr"]] + ([a["q_ptr"], a["y_ptr"]] if c["TWO_PAIRS"] else [])
        outs = [a["stats_ptr"], a["total_ptr"] if c["TWO_PAIRS"] else a["row_loss_ptr"]]
        read, written = sum(map(_tensor_bytes, ins)), sum(map(_tensor_bytes, outs))
        return OpCost("triton:loss_fwd", 1, read, written, 6 * sum(t.numel() for t in ins), dtype=str(ins[0].dtype))
    if launch.kernel == "loss_bwd":
        pairs = 2 if c["TWO_PAIRS"] else 1
        ins = [a["p_ptr"], a["z_ptr"]] + ([a["q_ptr"], a["y_ptr"]] if c["TWO_PAIRS"] else [])
        grads = [g for g, need in zip(("gp_ptr", "gz_ptr", "gq_ptr", "gy_ptr"),
                                      (c["NEED_P"], c["NEED_Z"], c["NEED_P"] and pairs == 2, c["NEED_Z"] and pairs == 2))
                 if need]
        read = sum(map(_tensor_bytes, ins)) + _tensor_bytes(a["stats_ptr"]) + _tensor_bytes(a["grad_ptr"])
        written = sum(_tensor_bytes(a[g]) for g in grads)
        return OpCost("triton:loss_bwd", 1, read, written, 4 * sum(t.numel() for t in ins), dtype=str(ins[0].dtype))
    if launch.kernel == "ema_kernel":
        lens = counter.constant(a["blk_len"]) if counter is not None else None
        n_blocks = a["blk_len"].numel()
        elems = int(lens.sum()) if lens is not None else n_blocks * c["BLOCK"]
        t_size = _TL_SIZES.get(str(c["T_DTYPE"]), 4)
        o_size = _TL_SIZES.get(str(c["O_DTYPE"]), 4)
        table = n_blocks * (8 + 8 + 4)
        return OpCost("triton:ema_kernel", 1, elems * (t_size + o_size) + table, elems * t_size, 3 * elems,
                      dtype=str(c["T_DTYPE"]))
    if launch.kernel == "photometric_kernel":
        # fastbyol_kernels.augment (as its photometric_bytes counts): pass 0 reads the crops for
        # contrast's grey sums; pass 1 reads them again and writes the views not blurred; pass 2
        # reads the blurred samples' blocks with their halos (each read counted, no cache
        # assumed), writes their views, and blurs through fp32 matrix products on the CUDA cores.
        x, out = a["x_ptr"], a["out_ptr"]
        values, n_blur = x[0].numel(), a["rows_ptr"].numel()
        xb, ob, n = x.element_size(), out.element_size(), x.shape[0]
        pass_ = c["PASS"]
        if pass_ == 0:
            return OpCost("triton:photometric_pass0", 1, values * xb * n, a["partial_ptr"].numel() * 4,
                          30 * values * n, dtype=str(out.dtype))
        if pass_ == 1:
            kept = n - n_blur
            return OpCost("triton:photometric_pass1", 1, values * xb * kept, values * ob * kept, 30 * values * kept,
                          dtype=str(out.dtype))
        pixels, flops = blur_reads_and_flops(x.shape[2], x.shape[3], c["BLUR_K"])
        return OpCost("triton:photometric_pass2", 1, 3 * pixels * xb * n_blur, values * ob * n_blur,
                      flops * n_blur, kind="matmul", dtype="float32")
    if launch.kernel == "lars_norms_finish_kernel":
        # fastbyol_kernels.lars: each tensor's block partials (two values a block) summed into
        # its pair of sums, from its first block's index and its size.
        size = _TL_SIZES.get(str(c["DTYPE"]), 4)
        parts, table = a["part_ptr"].numel(), a["first_blk"].numel() * (
            a["first_blk"].element_size() + a["numels"].element_size())
        return OpCost("triton:lars_norms_finish", 1, size * parts + table, size * a["sq_ptr"].numel(), parts,
                      dtype=str(c["DTYPE"]))
    if launch.kernel in ("lars_norms_kernel", "lars_update_kernel"):
        # fastbyol_kernels.lars: the norms read weights and gradients; the update reads weights,
        # gradients and momentum and writes momentum and weights (plus its block table).
        lens = counter.constant(a["numels"]) if counter is not None else None
        elems = int(lens.sum()) if lens is not None else a["blk_tensor"].numel() * c["BLOCK"]
        size = _TL_SIZES.get(str(c["DTYPE"]), 4)
        table = a["blk_tensor"].numel() * (a["blk_tensor"].element_size() + a["blk_offset"].element_size())
        if launch.kernel == "lars_norms_kernel":
            return OpCost("triton:lars_norms", 1, 2 * size * elems + table, 2 * size * a["blk_tensor"].numel(),
                          4 * elems, dtype=str(c["DTYPE"]))
        return OpCost("triton:lars_update", 1, 3 * size * elems + table, 2 * size * elems, 5 * elems,
                      dtype=str(c["DTYPE"]))
    raise ValueError(f"no cost rule for Triton kernel {launch.kernel!r}: add one to fastbyol.cost.counter.launch_cost")


_TL_SIZES = {"fp32": 4, "bf16": 2, "fp16": 2, "triton.language.float32": 4, "triton.language.bfloat16": 2,
             "triton.language.float16": 2, "fp64": 8, "triton.language.float64": 8}
