"""The BYOL loss, ``2 − 2·cos(p, z)`` per row, fused: one launch forward, one backward.

The forward kernel reads each row of p and z once (in chunks of the feature dimension),
accumulates ``p·z``, ``‖p‖²`` and ``‖z‖²`` in fp32, and writes the per-row loss plus those
three sums; the backward kernel reads the rows again and writes the gradients from the
saved sums, so nothing of size ``[B, D]`` is stored between the passes. Normalisation
follows ``F.normalize``: ``x / max(‖x‖, eps)`` with eps = 1e-12, and a row whose norm is
below eps gets the gradient of that clamped expression.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton

EPS = 1e-12


# ----------------------------------------------------------------------------- reference

def normalized_l2_loss_reference(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 − 2·cos(p, z)`` per row in fp32 (plain PyTorch; the CPU fallback)."""
    return 2 - 2 * (F.normalize(p.float(), dim=-1, eps=EPS) * F.normalize(z.float(), dim=-1, eps=EPS)).sum(-1)


def byol_loss_reference(p1, p2, z1, z2) -> torch.Tensor:
    return (normalized_l2_loss_reference(p1, z2) + normalized_l2_loss_reference(p2, z1)).mean()


# ----------------------------------------------------------------------------- Triton

def _get_kernels():
    from ._triton_loss import loss_bwd, loss_fwd  # triton is imported only here

    return loss_fwd, loss_bwd


def _blocks(B: int, D: int):
    """Tile sizes by heuristic (autotuning with several configs fails under the interpreter):
    a power-of-two slab of the feature dimension, and enough rows for ~4K elements a tile."""
    block_d = min(1024, max(16, 1 << (D - 1).bit_length()))
    block_b = max(1, min(64, 4096 // block_d))
    block_b = min(block_b, max(1, 1 << (B - 1).bit_length()))
    return block_b, block_d, (4 if block_b * block_d <= 4096 else 8)


def _check(*ts: torch.Tensor) -> None:
    shape = ts[0].shape
    for t in ts:
        if t.dim() != 2 or t.shape != shape:
            raise ValueError(f"BYOL loss inputs must all be [B, D] of one shape; got {[tuple(x.shape) for x in ts]}")
        if not t.is_floating_point():
            raise ValueError(f"BYOL loss inputs must be floating point, got {t.dtype}")
    if shape[0] < 1 or shape[1] < 1 or shape[1] > 8192:
        raise ValueError(f"BYOL loss supports B >= 1 and 1 <= D <= 8192, got {tuple(shape)}")


def _launch_fwd(p, z, q, y, two_pairs: bool):
    B, D = p.shape
    fwd, _ = _get_kernels()
    block_b, block_d, warps = _blocks(B, D)
    stats = torch.empty(B, 6, device=p.device, dtype=torch.float32)
    row_loss = torch.empty(B if not two_pairs else 1, device=p.device, dtype=torch.float32)
    total = torch.zeros((), device=p.device, dtype=torch.float32)
    grid = (triton_cdiv(B, block_b),)
    fwd[grid](p, z, q, y, stats, row_loss, total, B, D, p.stride(0), p.stride(1), z.stride(0), z.stride(1),
              q.stride(0), q.stride(1), y.stride(0), y.stride(1), EPS, 1.0 / B,
              TWO_PAIRS=two_pairs, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps)
    return (total if two_pairs else row_loss), stats


def _launch_bwd(p, z, q, y, stats, grad, need_p: bool, need_z: bool, two_pairs: bool):
    B, D = p.shape
    _, bwd = _get_kernels()
    block_b, block_d, warps = _blocks(B, D)
    gp = torch.empty(B, D, device=p.device, dtype=p.dtype) if need_p else None
    gz = torch.empty(B, D, device=p.device, dtype=z.dtype) if need_z else None
    gq = torch.empty(B, D, device=p.device, dtype=q.dtype) if need_p and two_pairs else None
    gy = torch.empty(B, D, device=p.device, dtype=y.dtype) if need_z and two_pairs else None
    dummy = stats  # never written when its flag is off
    grid = (triton_cdiv(B, block_b),)
    bwd[grid](p, z, q, y, stats, grad.contiguous(), gp if gp is not None else dummy, gz if gz is not None else dummy,
              gq if gq is not None else dummy, gy if gy is not None else dummy, B, D,
              p.stride(0), p.stride(1), z.stride(0), z.stride(1), q.stride(0), q.stride(1), y.stride(0), y.stride(1),
              EPS, 1.0 / B, TWO_PAIRS=two_pairs, NEED_P=need_p, NEED_Z=need_z,
              BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps)
    return gp, gz, gq, gy


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _ByolLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p1, p2, z1, z2):
        # Pair A = (p1, z2), pair B = (p2, z1).
        total, stats = _launch_fwd(p1, z2, p2, z1, two_pairs=True)
        ctx.save_for_backward(p1, p2, z1, z2, stats)
        return total

    @staticmethod
    def backward(ctx, grad):
        p1, p2, z1, z2, stats = ctx.saved_tensors
        need_p = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_z = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        if not (need_p or need_z):
            return None, None, None, None
        gp1, gz2, gp2, gz1 = _launch_bwd(p1, z2, p2, z1, stats, grad.reshape(1).float(), need_p, need_z, True)
        return gp1, gp2, gz1, gz2


class _PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, z):
        rows, stats = _launch_fwd(p, z, p, z, two_pairs=False)
        ctx.save_for_backward(p, z, stats)
        return rows

    @staticmethod
    def backward(ctx, grad):
        p, z, stats = ctx.saved_tensors
        need_p, need_z = ctx.needs_input_grad
        if not (need_p or need_z):
            return None, None
        gp, gz, _, _ = _launch_bwd(p, z, p, z, stats, grad.float(), need_p, need_z, False)
        return gp, gz


# ----------------------------------------------------------------------------- public API

def normalized_l2_loss(p: torch.Tensor, z: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Row-wise ``2 − 2·cos(p, z)`` (= ‖p/‖p‖ − z/‖z‖‖²) with F.normalize's eps semantics.

    Args:
        p, z: ``[B, D]`` fp32/bf16/fp16 tensors (any strides), 1 <= D <= 8192.
        backend: ``auto`` | ``triton`` | ``torch``.

    Returns:
        fp32 tensor ``[B]``. Differentiable w.r.t. whichever inputs require grad.

    Examples:
        >>> normalized_l2_loss(torch.randn(4, 256), torch.randn(4, 256)).shape
        torch.Size([4])
    """
    _check(p, z)
    if not use_triton(backend, (p, z)):
        return normalized_l2_loss_reference(p, z)
    return _PairLoss.apply(p, z)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *,
              backend: str = "auto") -> torch.Tensor:
    """BYOL's symmetric loss ``mean_i[(2 − 2cos(p1_i, z2_i)) + (2 − 2cos(p2_i, z1_i))]``.

    Args:
        p1, p2: online predictions of views 1 and 2, ``[B, D]``.
        z1, z2: target projections of views 1 and 2, ``[B, D]`` (normally detached).
        backend: ``auto`` | ``triton`` | ``torch``.

    Returns:
        fp32 scalar. With Triton: one forward launch and one backward launch for both pairs.

    Examples:
        >>> p1, p2 = torch.randn(8, 256, requires_grad=True), torch.randn(8, 256, requires_grad=True)
        >>> loss = byol_loss(p1, p2, torch.randn(8, 256), torch.randn(8, 256))
        >>> loss.backward()
    """
    _check(p1, p2, z1, z2)
    if not use_triton(backend, (p1, p2, z1, z2)):
        return byol_loss_reference(p1, p2, z1, z2)
    return _ByolLoss.apply(p1, p2, z1, z2)
