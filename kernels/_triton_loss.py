"""Triton kernels of the BYOL loss (imported only when the fused path runs; see loss.py).

A program owns ``BLOCK_B`` rows and walks the feature dimension in ``BLOCK_D`` slabs, so any
D works (not only powers of two) and registers stay bounded. Inputs are addressed through
their strides (no copy for transposed or sliced inputs); row offsets are computed in int64 so
that large or widely strided inputs cannot overflow.
"""
import triton
import triton.language as tl


@triton.jit
def _row_sums(a_ptr, b_ptr, rows, rmask, sa0, sa1, sb0, sb1, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row, in fp32: a·b, ‖a‖², ‖b‖²."""
    ab = tl.zeros((BLOCK_B,), dtype=tl.float32)
    aa = tl.zeros((BLOCK_B,), dtype=tl.float32)
    bb = tl.zeros((BLOCK_B,), dtype=tl.float32)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * sa0
    b_rows = b_ptr + rows.to(tl.int64)[:, None] * sb0
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        a = tl.load(a_rows + cols[None, :] * sa1, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_rows + cols[None, :] * sb1, mask=m, other=0.0).to(tl.float32)
        ab += tl.sum(a * b, axis=1)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
    return ab, aa, bb


@triton.jit
def _pair_loss(ab, aa, bb, eps):
    # F.normalize divides by max(‖x‖, eps): the same clamp, so zero rows give cos = 0, loss 2.
    return 2.0 - 2.0 * ab / (tl.maximum(tl.sqrt(aa), eps) * tl.maximum(tl.sqrt(bb), eps))


@triton.jit
def loss_fwd(p_ptr, z_ptr, q_ptr, y_ptr, stats_ptr, row_loss_ptr, total_ptr, B, D,
             sp0, sp1, sz0, sz1, sq0, sq1, sy0, sy1, eps, total_scale,
             TWO_PAIRS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pair A = (p, z), pair B = (q, y), both in this one launch. Saves per row the sums the
    backward needs, ``stats[row] = [p·z, ‖p‖², ‖z‖², q·y, ‖q‖², ‖y‖²]``, and writes either the
    per-row loss (one pair) or ``total_scale · Σ_rows (loss_A + loss_B)`` into ``total``."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    srow = stats_ptr + rows * 6
    ab, aa, bb = _row_sums(p_ptr, z_ptr, rows, rmask, sp0, sp1, sz0, sz1, D, BLOCK_B, BLOCK_D)
    tl.store(srow + 0, ab, mask=rmask)
    tl.store(srow + 1, aa, mask=rmask)
    tl.store(srow + 2, bb, mask=rmask)
    loss = _pair_loss(ab, aa, bb, eps)
    if TWO_PAIRS:
        cd, cc, dd = _row_sums(q_ptr, y_ptr, rows, rmask, sq0, sq1, sy0, sy1, D, BLOCK_B, BLOCK_D)
        tl.store(srow + 3, cd, mask=rmask)
        tl.store(srow + 4, cc, mask=rmask)
        tl.store(srow + 5, dd, mask=rmask)
        loss += _pair_loss(cd, cc, dd, eps)
        # The batch mean accumulates across programs: no second launch for the reduction
        # (the order of the atomic adds, hence the last bits, may vary run to run on a GPU).
        tl.atomic_add(total_ptr, tl.sum(tl.where(rmask, loss, 0.0), axis=0) * total_scale)
    else:
        tl.store(row_loss_ptr + rows, loss, mask=rmask)


@triton.jit
def _pair_grad(a_ptr, b_ptr, ga_ptr, gb_ptr, stats_ptr, col0, g, rows, rmask, sa0, sa1, sb0, sb1, D, eps,
               NEED_A: tl.constexpr, NEED_B: tl.constexpr, BLOCK_D: tl.constexpr):
    srow = stats_ptr + rows * 6 + col0
    ab = tl.load(srow, mask=rmask, other=0.0)
    an = tl.sqrt(tl.load(srow + 1, mask=rmask, other=1.0))
    bn = tl.sqrt(tl.load(srow + 2, mask=rmask, other=1.0))
    na, nb = tl.maximum(an, eps), tl.maximum(bn, eps)
    cos = ab / (na * nb)
    # L = 2 − 2·a·b/(Na·Nb) with Na = max(‖a‖, eps):
    #   dL/da = −2·b/(Na·Nb) + 2·cos·a/Na² · [‖a‖ ≥ eps]
    # Below eps, Na is the constant eps and the second term vanishes (clamp_min passes the
    # gradient where ‖a‖ ≥ eps, as autograd of F.normalize does). Symmetric for b.
    cross = -2.0 * g / (na * nb)
    self_a = tl.where(an >= eps, 2.0 * g * cos / (na * na), 0.0)
    self_b = tl.where(bn >= eps, 2.0 * g * cos / (nb * nb), 0.0)
    rows64 = rows.to(tl.int64)
    a_rows = a_ptr + rows64[:, None] * sa0
    b_rows = b_ptr + rows64[:, None] * sb0
    out_rows = rows64[:, None] * D  # gradients are written contiguous
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        a = tl.load(a_rows + cols[None, :] * sa1, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_rows + cols[None, :] * sb1, mask=m, other=0.0).to(tl.float32)
        out = out_rows + cols[None, :]
        if NEED_A:
            tl.store(ga_ptr + out, (cross[:, None] * b + self_a[:, None] * a).to(ga_ptr.dtype.element_ty), mask=m)
        if NEED_B:
            tl.store(gb_ptr + out, (cross[:, None] * a + self_b[:, None] * b).to(gb_ptr.dtype.element_ty), mask=m)


@triton.jit
def loss_bwd(p_ptr, z_ptr, q_ptr, y_ptr, stats_ptr, grad_ptr, gp_ptr, gz_ptr, gq_ptr, gy_ptr, B, D,
             sp0, sp1, sz0, sz1, sq0, sq1, sy0, sy1, s_grad, eps, grad_scale,
             TWO_PAIRS: tl.constexpr, NEED_P: tl.constexpr, NEED_Z: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradients of both pairs from the saved sums; re-reads the inputs once (the saved sums
    replace the [B, D] normalised copies autograd would keep)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    if TWO_PAIRS:  # upstream gradient of the scalar mean, read on device (no host sync)
        g = tl.load(grad_ptr).to(tl.float32) * grad_scale
    else:  # one upstream gradient per row (any stride: sum()'s backward hands in stride 0)
        g = tl.load(grad_ptr + rows * s_grad, mask=rmask, other=0.0).to(tl.float32)
    _pair_grad(p_ptr, z_ptr, gp_ptr, gz_ptr, stats_ptr, 0, g, rows, rmask, sp0, sp1, sz0, sz1, D, eps,
               NEED_P, NEED_Z, BLOCK_D)
    if TWO_PAIRS:
        _pair_grad(q_ptr, y_ptr, gq_ptr, gy_ptr, stats_ptr, 3, g, rows, rmask, sq0, sq1, sy0, sy1, D, eps,
                   NEED_P, NEED_Z, BLOCK_D)
