"""Every Triton launch of fastbyol_kernels, described in one place.

A :class:`Launch` names the kernel and holds its grid, its runtime arguments (by name, in
the kernel's order), its constexprs and its warp count. The launchers in :mod:`.ema`,
:mod:`.loss` and :mod:`.lars` build their launches here and run them; the ahead-of-time compile check
(:mod:`.aot`, ``tests/test_aot_compile.py``) compiles the very same descriptions for real
GPUs. So the signatures, constexprs and block sizes that are checked are the ones that run:
a launcher cannot change one without the check seeing it.

The builders allocate their outputs on the inputs' device, so with ``meta`` tensors they
describe a launch of any size without memory (that is how the compile check uses them).
"""
from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

EMA_BLOCK = 4096  # elements per program: 16 fp32 per thread at 8 warps, 4 vector loads each side
EMA_WARPS = 8
LOSS_EPS = 1e-12  # F.normalize's eps


@dataclass
class Launch:
    """One kernel launch: ``module.kernel[grid](*args.values(), **constexprs, num_warps=num_warps)``."""

    module: str  # the kernel's module inside fastbyol_kernels, e.g. "_triton_ema"
    kernel: str
    grid: Tuple[int, ...]
    args: Dict[str, Any]  # runtime arguments: tensors, ints, floats, in the kernel's order
    constexprs: Dict[str, Any]
    num_warps: int

    def run(self, fn: Optional[Any] = None) -> None:
        """Launch it (``fn``: the kernel, if not the package's own, e.g. a wrapped one)."""
        if fn is None:
            fn = getattr(importlib.import_module(f".{self.module}", __package__), self.kernel)
        fn[self.grid](*self.args.values(), **self.constexprs, num_warps=self.num_warps)

    def label(self) -> str:
        """Short human-readable name of this specialisation, e.g. for test ids."""
        parts = [f"{k}={self.args[k]}" for k in ("B", "D") if k in self.args]  # the loss's sizes
        parts += [f"{k}={_short(v)}" for k, v in self.constexprs.items()]
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in self.args.values() if isinstance(v, torch.Tensor)})
        return f"{self.kernel}[{','.join(parts)}|{'/'.join(dtypes)}|w{self.num_warps}]"


def _short(v) -> str:
    return str(v).replace("triton.language.", "").replace("fp32", "f32")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl  # triton is imported only when a kernel is about to run

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}[dtype]


# ----------------------------------------------------------------------------- EMA

def ema_launch(plan, momentum, stochastic_rounding: bool = False, seed: int = 0) -> Launch:
    """The multi-tensor EMA over one block table (:mod:`.ema`): one program per block.

    The specialisations are: the dtype pair (``T_DTYPE``, ``O_DTYPE``: fp32, bf16, fp16
    each), ``M_IS_TENSOR`` (with the momentum tensor's dtype, fp32 or fp64, as a second
    specialisation), ``ALIGNED``, ``STOCHASTIC`` (bf16 targets only) and ``BLOCK``.

    Args:
        plan: one group's block table (``t_blocks``, ``o_blocks``, ``blk_len`` on the device;
            ``t_dtype``, ``o_dtype``, ``aligned``, ``block``).
        momentum: a checked float (its ``1 − m`` formed here in double, reaching the kernel
            as fp32) or 0-d tensor on the plan's device (read and combined in the kernel).
        stochastic_rounding: round to bf16 stochastically (only bf16 targets do).
        seed: the stochastic-rounding stream, below 2**31.
    """
    m_is_tensor = isinstance(momentum, torch.Tensor)
    if m_is_tensor:  # the scalar is unused
        m_ptr, w_value = momentum, 0.0
    else:  # the pointer is unused: any tensor will do
        m_ptr, w_value = plan.blk_len, 1.0 - momentum
    return Launch(
        "_triton_ema", "ema_kernel", (plan.blk_len.numel(),),
        dict(t_blocks=plan.t_blocks, o_blocks=plan.o_blocks, blk_len=plan.blk_len, m_ptr=m_ptr, w_value=w_value, seed=seed),
        dict(T_DTYPE=_tl_dtype(plan.t_dtype), O_DTYPE=_tl_dtype(plan.o_dtype), M_IS_TENSOR=m_is_tensor,
             ALIGNED=plan.aligned, STOCHASTIC=bool(stochastic_rounding and plan.t_dtype == torch.bfloat16),
             BLOCK=plan.block),
        EMA_WARPS)


# ----------------------------------------------------------------------------- loss

def loss_blocks(B: int, D: int) -> Tuple[int, int, int]:
    """``(BLOCK_B, BLOCK_D, num_warps)`` of the loss kernels, by heuristic (``@triton.autotune``
    with several configs fails under the interpreter): a power-of-two slab of the feature
    dimension (at most 1024, looped over for larger D) and enough rows for ~2K elements a
    tile, which keeps 16 fp32 values per thread and input at 4 warps and gives B = 4096,
    D = 256 512 programs to spread over the SMs."""
    block_d = min(1024, max(16, 1 << (D - 1).bit_length()))
    block_b = max(1, min(64, 2048 // block_d, 1 << (B - 1).bit_length()))
    return block_b, block_d, (4 if block_b * block_d <= 2048 else 8)


def loss_fwd_launch(p, z, q, y, two_pairs: bool) -> Launch:
    """Forward of pair (p, z) and, with ``two_pairs``, pair (q, y), in one launch.

    Outputs (allocated here): ``args["stats_ptr"]`` ``[B, 6]`` fp32 (saved for the backward),
    and ``args["total_ptr"]`` (fp32 scalar: the symmetric batch mean) with two pairs, else
    ``args["row_loss_ptr"]`` (fp32 ``[B]``).
    """
    B, D = p.shape
    block_b, block_d, warps = loss_blocks(B, D)
    stats = torch.empty(B, 6, device=p.device, dtype=torch.float32)
    # Two pairs: the batch mean, accumulated atomically (hence zeroed: a memset, not a kernel
    # of ours). One pair: the per-row losses. The unused output gets a stand-in never written.
    if two_pairs:
        total = torch.zeros((), device=p.device, dtype=torch.float32)
        row_loss = stats
    else:
        row_loss = torch.empty(B, device=p.device, dtype=torch.float32)
        total = row_loss
    return Launch(
        "_triton_loss", "loss_fwd", (_cdiv(B, block_b),),
        dict(p_ptr=p, z_ptr=z, q_ptr=q, y_ptr=y, stats_ptr=stats, row_loss_ptr=row_loss, total_ptr=total, B=B, D=D,
             sp0=p.stride(0), sp1=p.stride(1), sz0=z.stride(0), sz1=z.stride(1),
             sq0=q.stride(0), sq1=q.stride(1), sy0=y.stride(0), sy1=y.stride(1), eps=LOSS_EPS, total_scale=1.0 / B),
        dict(TWO_PAIRS=two_pairs, BLOCK_B=block_b, BLOCK_D=block_d), warps)


def loss_bwd_launch(p, z, q, y, stats, grad, need_p: bool, need_z: bool, two_pairs: bool) -> Launch:
    """Backward of :func:`loss_fwd_launch` from its saved ``stats`` and the upstream ``grad``
    (a scalar with two pairs, ``[B]`` of any stride with one).

    Outputs (allocated here, contiguous, in each input's dtype): ``args["gp_ptr"]``,
    ``["gz_ptr"]`` and with two pairs ``["gq_ptr"]``, ``["gy_ptr"]``; see :func:`grads_of`.
    """
    B, D = p.shape
    block_b, block_d, warps = loss_blocks(B, D)

    def new_grad(x, need):
        # A gradient that is not needed gets ``stats`` as a stand-in, never written.
        return torch.empty(B, D, device=x.device, dtype=x.dtype) if need else stats

    gp, gz = new_grad(p, need_p), new_grad(z, need_z)
    gq, gy = (new_grad(q, need_p), new_grad(y, need_z)) if two_pairs else (stats, stats)
    return Launch(
        "_triton_loss", "loss_bwd", (_cdiv(B, block_b),),
        dict(p_ptr=p, z_ptr=z, q_ptr=q, y_ptr=y, stats_ptr=stats, grad_ptr=grad, gp_ptr=gp, gz_ptr=gz, gq_ptr=gq,
             gy_ptr=gy, B=B, D=D, sp0=p.stride(0), sp1=p.stride(1), sz0=z.stride(0), sz1=z.stride(1),
             sq0=q.stride(0), sq1=q.stride(1), sy0=y.stride(0), sy1=y.stride(1),
             s_grad=0 if two_pairs else grad.stride(0), eps=LOSS_EPS, grad_scale=1.0 / B),
        dict(TWO_PAIRS=two_pairs, NEED_P=need_p, NEED_Z=need_z, BLOCK_B=block_b, BLOCK_D=block_d), warps)


def grads_of(launch: Launch):
    """The gradients of p, z, q, y a :func:`loss_bwd_launch` writes (None where not needed)."""
    c, a = launch.constexprs, launch.args
    needs = (c["NEED_P"], c["NEED_Z"], c["NEED_P"] and c["TWO_PAIRS"], c["NEED_Z"] and c["TWO_PAIRS"])
    return tuple(a[k] if need else None for k, need in zip(("gp_ptr", "gz_ptr", "gq_ptr", "gy_ptr"), needs))


# ----------------------------------------------------------------------------- photometric augmentation

AUGMENT_BLOCK = 512  # pixels (x 3 channels) per program: 4 per thread at 4 warps, the hue round trip in registers
AUGMENT_WARPS = 4
AUGMENT_PARAMS = 12  # columns of the per-sample parameter table (augment.PARAM_COLUMNS)


def augment_blocks(hw: int) -> Tuple[int, int, int]:
    """``(BLOCK, tiles per sample, num_warps)`` for ``hw`` pixels a sample: tiles of at most
    :data:`AUGMENT_BLOCK` pixels (smaller images, from 32², one power-of-two tile)."""
    block = min(AUGMENT_BLOCK, max(16, 1 << (hw - 1).bit_length()))
    return block, _cdiv(hw, block), AUGMENT_WARPS


BLUR_ROWS = 16  # pass 2 colours its input tile 16 x 16 pixels at a time (a matrix product's least side)
BLUR_COLS = 32  # output columns a pass-2 program
BLUR_WARPS = 16  # 128 registers a thread at most (one program fills an SM's registers); at 8 warps it took 255


def blur_tile(kernel_size: int) -> int:
    """Input rows of a pass-2 program for a blur of ``kernel_size`` taps: a power of two (the
    matrix product's side), at least 32 and at least twice the halo, so that the output rows
    (``tile - 2·(kernel_size // 2)``) are at least half of it (64 at 23 taps: 42 rows)."""
    return max(32, 1 << (4 * (kernel_size // 2) - 1).bit_length())


def blur_tiles(H: int, W: int, kernel_size: int) -> Tuple[int, int, int]:
    """``(input rows, output rows, programs a sample)`` of pass 2 on ``H x W`` images; a program
    writes ``output rows x BLUR_COLS`` pixels and colours ``input rows x`` (``BLUR_COLS`` and the
    halo, in whole ``BLUR_ROWS``)."""
    tile = blur_tile(kernel_size)
    out = tile - 2 * (kernel_size // 2)
    return tile, out, _cdiv(H, out) * _cdiv(W, BLUR_COLS)


def blur_reads_and_flops(H: int, W: int, kernel_size: int) -> Tuple[int, int]:
    """Pixels pass 2 loads for one blurred ``H x W`` sample (each program its block and halo,
    the image's edges masked off: a pixel in several programs' halos is counted in each) and
    the FLOPs of its matrix products (three channels)."""
    tile, out, programs = blur_tiles(H, W, kernel_size)
    half = kernel_size // 2
    in_cols = _cdiv(BLUR_COLS + 2 * half, BLUR_ROWS) * BLUR_ROWS

    def covered(size, step, span):  # in-image pixels of each block's [start - half, start - half + span)
        return sum(min(size, s - half + span) - max(0, s - half) for s in range(0, size, step))

    slabs, chunks = tile // BLUR_ROWS, in_cols // BLUR_ROWS
    per_program = 3 * (slabs * chunks * 2 * BLUR_ROWS * BLUR_ROWS * BLUR_COLS + slabs * 2 * tile * BLUR_ROWS * BLUR_COLS)
    return covered(H, out, tile) * covered(W, BLUR_COLS, in_cols), per_program * programs


def photometric_launches(x, params, out, slots, rows, sigma, mean, std, blur_kernel_size: int) -> list:
    """The passes of the fused photometric augmentation (:mod:`.augment`), in order.

    Args:
        x: ``[B, 3, H, W]`` uint8 (divided by 255) or float in [0, 1], any strides.
        params: fp32 ``[B, AUGMENT_PARAMS]`` contiguous, the per-sample table.
        out: ``[B, 3, H, W]`` output (fp32, bf16, fp16), any strides.
        slots: int32 ``[B]``: the sample's index in ``rows`` if it is blurred, else -1.
        rows: int32 ``[n_blurred]``: the blurred samples (``slots``' inverse).
        sigma: fp32 ``[n_blurred]``, each blurred sample's σ in pixels.
        mean, std: three floats each (normalisation).
        blur_kernel_size: the blur's taps (odd).

    Pass 0 (``B x tiles`` programs) writes contrast's per-tile grey sums into a zeroed
    ``[B, tiles]`` fp32 table (``args["partial_ptr"]``); pass 1 (``B x tiles``) the views of
    the samples not blurred; when some sample is blurred, pass 2 (``n_blurred x`` :func:`blur_tiles`)
    theirs, colour and blur fused.
    """
    B, _, H, W = x.shape
    block, n_tiles, warps = augment_blocks(H * W)
    tile, _, n_blur_tiles = blur_tiles(H, W, blur_kernel_size)
    partial = torch.zeros(B, n_tiles, device=x.device, dtype=torch.float32)
    args = dict(x_ptr=x, params_ptr=params, partial_ptr=partial, out_ptr=out, slot_ptr=slots, rows_ptr=rows,
                sigma_ptr=sigma, H=H, W=W, n_tiles=n_tiles,
                sxb=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
                sob=out.stride(0), soc=out.stride(1), soh=out.stride(2), sow=out.stride(3),
                mean0=float(mean[0]), mean1=float(mean[1]), mean2=float(mean[2]),
                std0=float(std[0]), std1=float(std[1]), std2=float(std[2]))
    const = dict(IN_UINT8=x.dtype == torch.uint8, BLOCK=block, BLOCK_TILES=max(2, 1 << (n_tiles - 1).bit_length()),
                 BLUR_K=int(blur_kernel_size), BLUR_TILE=tile, BLUR_COLS=BLUR_COLS, BLUR_ROWS=BLUR_ROWS)
    launches = [Launch("_triton_augment", "photometric_kernel", (n_tiles, B), args, dict(PASS=p, **const), warps)
                for p in (0, 1)]
    if rows.numel():
        launches.append(Launch("_triton_augment", "photometric_kernel", (n_blur_tiles, rows.numel()), args,
                               dict(PASS=2, **const), BLUR_WARPS))
    return launches


# ----------------------------------------------------------------------------- LARS

LARS_WARPS = 8
# 8 values per thread per tensor at 8 warps (fp64: 4, the same registers): the update holds
# three tensors' blocks; at 16 fp32 values it needed 143 registers (aot.MAX_REGISTERS is 128).
LARS_BLOCKS = {torch.float32: 2048, torch.float64: 1024}


def _hi_lo(x: float) -> Tuple[float, float]:
    """``x`` as two fp32 values whose fp64 sum carries 48 bits (Triton passes floats as fp32)."""
    hi = _f32(x)
    return hi, _f32(x - hi)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


LARS_RBLOCK = 1024  # block partials the finishing kernel sums a step (ResNet-50's largest tensor: 1,152 blocks)


def lars_norms_launches(plan, g_ptrs, weight_decay: float, aligned: bool) -> Tuple[list, torch.Tensor]:
    """Per-tensor ``Σ w²`` and ``Σ (g + wd·w)²`` of one group, in two launches: one program per
    block of the plan's table writes its block's pair (``args["part_ptr"]``, ``[2·blocks]``),
    then one program per tensor sums its blocks' pairs in a fixed order. Returns the launches
    and ``sq`` (``[2T]``, what the update reads); both outputs are one allocation, no memset.

    Args:
        plan: the group's block table (``blk_tensor``, ``blk_offset``, ``first_blk``, ``numels``,
            ``w_ptrs`` on the device; ``dtype``, ``block``, ``n_blocks``, ``n_tensors``).
        g_ptrs: the gradients' addresses, int64 ``[T]`` on the device.
        aligned: every base address (weights, gradients) 16-byte aligned.
    """
    wd = _hi_lo(weight_decay)
    start = _cdiv(2 * plan.n_tensors, 4) * 4  # both parts 16-byte aligned: one specialisation each
    out = torch.empty(start + 2 * plan.n_blocks, dtype=plan.dtype, device=plan.numels.device)
    sq, part = out[:2 * plan.n_tensors], out[start:]
    norms = Launch(
        "_triton_lars", "lars_norms_kernel", (plan.n_blocks,),
        dict(blk_tensor=plan.blk_tensor, blk_offset=plan.blk_offset, numels=plan.numels, w_ptrs=plan.w_ptrs,
             g_ptrs=g_ptrs, part_ptr=part, wd_hi=wd[0], wd_lo=wd[1]),
        dict(DTYPE=_tl_dtype(plan.dtype), ALIGNED=aligned, BLOCK=plan.block), LARS_WARPS)
    finish = Launch(
        "_triton_lars", "lars_norms_finish_kernel", (plan.n_tensors,),
        dict(first_blk=plan.first_blk, numels=plan.numels, part_ptr=part, sq_ptr=sq),
        dict(DTYPE=_tl_dtype(plan.dtype), BLOCK=plan.block, RBLOCK=LARS_RBLOCK), 4)
    return [norms, finish], sq


def lars_update_launch(plan, g_ptrs, sq, lr: float, momentum: float, weight_decay: float, trust_coefficient: float,
                       adapt: bool, aligned: bool) -> Launch:
    """The momentum and weight update of one group, from the norms in ``sq`` (``adapt``) or
    without trust ratio and weight decay (excluded group: ``sq`` unused)."""
    lr, m, wd, eta = (_hi_lo(v) for v in (lr, momentum, weight_decay, trust_coefficient))
    return Launch(
        "_triton_lars", "lars_update_kernel", (plan.n_blocks,),
        dict(blk_tensor=plan.blk_tensor, blk_offset=plan.blk_offset, numels=plan.numels, w_ptrs=plan.w_ptrs,
             g_ptrs=g_ptrs, b_ptrs=plan.b_ptrs, sq_ptr=sq, lr_hi=lr[0], lr_lo=lr[1], m_hi=m[0], m_lo=m[1],
             wd_hi=wd[0], wd_lo=wd[1], eta_hi=eta[0], eta_lo=eta[1]),
        dict(DTYPE=_tl_dtype(plan.dtype), ADAPT=adapt, ALIGNED=aligned, BLOCK=plan.block), LARS_WARPS)
