"""Triton kernels of the BYOL loss (imported only when the fused path runs; see loss.py)."""
import triton
import triton.language as tl


@triton.jit
def _row_sums(a_ptr, b_ptr, rows, rmask, sa0, sa1, sb0, sb1, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    ab = tl.zeros((BLOCK_B,), dtype=tl.float32)
    aa = tl.zeros((BLOCK_B,), dtype=tl.float32)
    bb = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        a = tl.load(a_ptr + rows[:, None] * sa0 + cols[None, :] * sa1, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * sb0 + cols[None, :] * sb1, mask=m, other=0.0).to(tl.float32)
        ab += tl.sum(a * b, axis=1)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
    return ab, aa, bb


@triton.jit
def _pair_loss(ab, aa, bb, eps):
    return 2.0 - 2.0 * ab / (tl.maximum(tl.sqrt(aa), eps) * tl.maximum(tl.sqrt(bb), eps))


@triton.jit
def loss_fwd(p_ptr, z_ptr, q_ptr, y_ptr, stats_ptr, row_loss_ptr, total_ptr, B, D,
             sp0, sp1, sz0, sz1, sq0, sq1, sy0, sy1, eps, total_scale,
             TWO_PAIRS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # Pair A = (p, z), pair B = (q, y). stats rows: [p·z, ‖p‖², ‖z‖², q·y, ‖q‖², ‖y‖²].
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    ab, aa, bb = _row_sums(p_ptr, z_ptr, rows, rmask, sp0, sp1, sz0, sz1, D, BLOCK_B, BLOCK_D)
    tl.store(stats_ptr + rows * 6 + 0, ab, mask=rmask)
    tl.store(stats_ptr + rows * 6 + 1, aa, mask=rmask)
    tl.store(stats_ptr + rows * 6 + 2, bb, mask=rmask)
    loss = _pair_loss(ab, aa, bb, eps)
    if TWO_PAIRS:
        cd, cc, dd = _row_sums(q_ptr, y_ptr, rows, rmask, sq0, sq1, sy0, sy1, D, BLOCK_B, BLOCK_D)
        tl.store(stats_ptr + rows * 6 + 3, cd, mask=rmask)
        tl.store(stats_ptr + rows * 6 + 4, cc, mask=rmask)
        tl.store(stats_ptr + rows * 6 + 5, dd, mask=rmask)
        loss += _pair_loss(cd, cc, dd, eps)
        # The batch mean, accumulated across programs: no second launch for the reduction.
        tl.atomic_add(total_ptr, tl.sum(tl.where(rmask, loss, 0.0), axis=0) * total_scale)
    else:
        tl.store(row_loss_ptr + rows, loss, mask=rmask)


@triton.jit
def _pair_grad(a_ptr, b_ptr, ga_ptr, gb_ptr, stats_ptr, col0, g, rows, rmask, sa0, sa1, sb0, sb1, D, eps,
               NEED_A: tl.constexpr, NEED_B: tl.constexpr, BLOCK_D: tl.constexpr):
    ab = tl.load(stats_ptr + rows * 6 + col0, mask=rmask, other=0.0)
    an = tl.sqrt(tl.load(stats_ptr + rows * 6 + col0 + 1, mask=rmask, other=1.0))
    bn = tl.sqrt(tl.load(stats_ptr + rows * 6 + col0 + 2, mask=rmask, other=1.0))
    na, nb = tl.maximum(an, eps), tl.maximum(bn, eps)
    cos = ab / (na * nb)
    # d(2 - 2·a·b/(Na·Nb))/da = -2·(b/(Na·Nb) - cos·a/Na²·[‖a‖ > eps]); symmetric for b.
    cross = -2.0 * g / (na * nb)
    self_a = tl.where(an > eps, 2.0 * g * cos / (na * na), 0.0)
    self_b = tl.where(bn > eps, 2.0 * g * cos / (nb * nb), 0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        a = tl.load(a_ptr + rows[:, None] * sa0 + cols[None, :] * sa1, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * sb0 + cols[None, :] * sb1, mask=m, other=0.0).to(tl.float32)
        out = rows[:, None] * D + cols[None, :]
        if NEED_A:
            tl.store(ga_ptr + out, cross[:, None] * b + self_a[:, None] * a, mask=m)
        if NEED_B:
            tl.store(gb_ptr + out, cross[:, None] * a + self_b[:, None] * b, mask=m)


@triton.jit
def loss_bwd(p_ptr, z_ptr, q_ptr, y_ptr, stats_ptr, grad_ptr, gp_ptr, gz_ptr, gq_ptr, gy_ptr, B, D,
             sp0, sp1, sz0, sz1, sq0, sq1, sy0, sy1, eps, grad_scale,
             TWO_PAIRS: tl.constexpr, NEED_P: tl.constexpr, NEED_Z: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    if TWO_PAIRS:  # upstream gradient of the scalar mean, read on device (no host sync)
        g = tl.load(grad_ptr + rows * 0, mask=rmask, other=0.0).to(tl.float32) * grad_scale
    else:
        g = tl.load(grad_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    _pair_grad(p_ptr, z_ptr, gp_ptr, gz_ptr, stats_ptr, 0, g, rows, rmask, sp0, sp1, sz0, sz1, D, eps,
               NEED_P, NEED_Z, BLOCK_D)
    if TWO_PAIRS:
        _pair_grad(q_ptr, y_ptr, gq_ptr, gy_ptr, stats_ptr, 3, g, rows, rmask, sq0, sq1, sy0, sy1, D, eps,
                   NEED_P, NEED_Z, BLOCK_D)
