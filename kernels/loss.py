"""The BYOL loss, ``2 − 2·cos(p, z)`` per row, fused: one launch forward, one backward.

BYOL (Grill et al., 2020, eq. 2) regresses the online prediction onto the target
projection after L2 normalisation: ``‖p̄ − z̄‖² = 2 − 2·⟨p, z⟩/(‖p‖·‖z‖)``, symmetrised over
the two views. The forward kernel reads each row of every input once (in slabs of the
feature dimension), accumulates ``p·z``, ``‖p‖²`` and ``‖z‖²`` in fp32 for both pairs, and
writes the loss plus those six sums per row; the backward kernel re-reads the inputs and
writes the gradients from the saved sums. So the saved state is ``[B, 6]`` fp32 instead of
the normalised ``[B, D]`` copies eager autograd keeps, and the traffic is the floor: inputs
read once per pass, gradients written once. Normalisation follows ``F.normalize``:
``x / max(‖x‖, eps)`` with eps = 1e-12, and a row whose norm is below eps gets the gradient
of that clamped expression (a zero row: loss 2, finite gradients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton
from .launches import LOSS_EPS as EPS, grads_of, loss_bwd_launch, loss_fwd_launch


# ----------------------------------------------------------------------------- reference

def normalized_l2_loss_reference(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 − 2·cos(p, z)`` per row, computed in fp32 with F.normalize (the fallback).

    Examples:
        >>> normalized_l2_loss_reference(torch.ones(2, 3), -torch.ones(2, 3))
        tensor([4., 4.])
    """
    return 2 - 2 * (F.normalize(p.float(), dim=-1, eps=EPS) * F.normalize(z.float(), dim=-1, eps=EPS)).sum(-1)


def byol_loss_reference(p1, p2, z1, z2) -> torch.Tensor:
    """``mean_i[ℓ(p1_i, z2_i) + ℓ(p2_i, z1_i)]`` with the reference row loss (the fallback).

    Examples:
        >>> x = torch.randn(4, 8)
        >>> byol_loss_reference(x, x, x, x).abs().item() < 1e-6
        True
    """
    return (normalized_l2_loss_reference(p1, z2) + normalized_l2_loss_reference(p2, z1)).mean()


# ----------------------------------------------------------------------------- Triton

def _check(*ts: torch.Tensor) -> None:
    shape = ts[0].shape
    for t in ts:
        if t.dim() != 2 or t.shape != shape:
            raise ValueError(f"BYOL loss inputs must all be [B, D] of one shape; got {[tuple(x.shape) for x in ts]}")
        if not t.is_floating_point():
            raise ValueError(f"BYOL loss inputs must be floating point, got {t.dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"BYOL loss needs B >= 1 and D >= 1, got {tuple(shape)}")


def _run_kernel(backend: str, ts) -> bool:
    """Triton or the reference; under ``auto`` dtypes the kernel lacks (fp64) take the reference."""
    if not use_triton(backend, ts):
        return False
    if all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in ts):
        return True
    if backend == "triton":
        raise ValueError(f"BYOL loss (triton) takes fp32, bf16 or fp16 inputs, got {[t.dtype for t in ts]}; "
                         f"use backend='auto' or 'torch'")
    return False


def _launch_fwd(p, z, q, y, two_pairs: bool):
    launch = loss_fwd_launch(p, z, q, y, two_pairs)
    launch.run()
    out = launch.args["total_ptr"] if two_pairs else launch.args["row_loss_ptr"]
    return out, launch.args["stats_ptr"]


def _launch_bwd(p, z, q, y, stats, grad, need_p: bool, need_z: bool, two_pairs: bool):
    """Returns the gradients of p, z, q, y (None where not needed)."""
    launch = loss_bwd_launch(p, z, q, y, stats, grad, need_p, need_z, two_pairs)
    launch.run()
    return grads_of(launch)


def _only_needed(grads, needs):
    return tuple(g if need else None for g, need in zip(grads, needs))


class _ByolLoss(torch.autograd.Function):
    """Both pairs of the symmetric loss in one forward and one backward launch."""

    @staticmethod
    def forward(ctx, p1, p2, z1, z2):
        # Pair A = (p1, z2), pair B = (p2, z1): each prediction against the other view's target.
        total, stats = _launch_fwd(p1, z2, p2, z1, two_pairs=True)
        ctx.save_for_backward(p1, p2, z1, z2, stats)
        return total

    @staticmethod
    def backward(ctx, grad):
        p1, p2, z1, z2, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_p, need_z = needs[0] or needs[1], needs[2] or needs[3]
        if not (need_p or need_z):
            return None, None, None, None
        gp1, gz2, gp2, gz1 = _launch_bwd(p1, z2, p2, z1, stats, grad, need_p, need_z, True)
        return _only_needed((gp1, gp2, gz1, gz2), needs)


class _PairLoss(torch.autograd.Function):
    """Row-wise loss of one pair: the same kernels with the second pair switched off."""

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
        gp, gz, _, _ = _launch_bwd(p, z, p, z, stats, grad, need_p, need_z, False)
        return gp, gz


# ----------------------------------------------------------------------------- public API

def normalized_l2_loss(p: torch.Tensor, z: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Row-wise ``2 − 2·cos(p, z)`` (= ‖p/‖p‖ − z/‖z‖‖²) with F.normalize's eps semantics.

    Args:
        p, z: ``[B, D]`` fp32/bf16/fp16 tensors (any strides), B >= 1, D >= 1 (the kernel
            loops over D in slabs; tested up to 8192). Under ``auto``, fp64 takes the reference.
        backend: ``auto`` | ``triton`` | ``torch`` (see the package docstring).

    Returns:
        fp32 tensor ``[B]`` (sums accumulate in fp32 whatever the input dtype).
        Differentiable w.r.t. whichever inputs require grad; each gradient has its input's
        dtype and shape (contiguous).

    Raises:
        ValueError: shapes, dtypes or backend name not accepted.
        RuntimeError: ``backend="triton"`` where the kernel cannot run.

    Examples:
        >>> normalized_l2_loss(torch.randn(4, 256), torch.randn(4, 256)).shape
        torch.Size([4])
    """
    _check(p, z)
    if not _run_kernel(backend, (p, z)):
        return normalized_l2_loss_reference(p, z)
    return _PairLoss.apply(p, z)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *,
              backend: str = "auto") -> torch.Tensor:
    """BYOL's symmetric loss ``mean_i[(2 − 2cos(p1_i, z2_i)) + (2 − 2cos(p2_i, z1_i))]``.

    Args:
        p1, p2: online predictions of views 1 and 2, ``[B, D]``, fp32/bf16/fp16, any strides,
            B >= 1, D >= 1 (tested up to 8192). Under ``auto``, fp64 takes the reference.
        z1, z2: target projections of views 1 and 2, same shape (normally detached; if they
            require grad, e.g. SimSiam-style without stop-gradient, they get gradients too).
        backend: ``auto`` | ``triton`` | ``torch`` (see the package docstring).

    Returns:
        fp32 scalar. With Triton: one forward launch and one backward launch for both pairs;
        gradients come back in each input's dtype. The batch mean is accumulated with atomic
        adds, so on a GPU its last bits may differ from run to run.

    Raises:
        ValueError: shapes, dtypes or backend name not accepted.
        RuntimeError: ``backend="triton"`` where the kernel cannot run.

    Examples:
        >>> p1, p2 = torch.randn(8, 256, requires_grad=True), torch.randn(8, 256, requires_grad=True)
        >>> loss = byol_loss(p1, p2, torch.randn(8, 256), torch.randn(8, 256))
        >>> loss.backward()
    """
    _check(p1, p2, z1, z2)
    if not _run_kernel(backend, (p1, p2, z1, z2)):
        return byol_loss_reference(p1, p2, z1, z2)
    return _ByolLoss.apply(p1, p2, z1, z2)
