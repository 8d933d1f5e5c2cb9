"""Triton kernels of the multi-tensor LARS step (imported only when the fused path runs; see
lars.py, whose launch builders in launches.py give every launch: grid, arguments, constexprs).

The norms and update kernels walk one block table: program ``pid`` takes block ``pid``, i.e. elements
``[offset, offset + BLOCK)`` of tensor ``blk_tensor[pid]``, whose addresses come from the
per-tensor pointer arrays (so a step whose gradients moved rewrites ``T`` pointers, not the
table). Scalars arrive as fp32 pairs ``hi + lo`` (Triton passes Python floats as fp32): fp32
kernels use ``hi`` (what PyTorch's fp32 ops use), fp64 kernels ``hi + lo`` (48 bits).
"""
import triton
import triton.language as tl


@triton.jit
def _scalar(hi, lo, DTYPE: tl.constexpr):
    if DTYPE == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return hi


@triton.jit
def _locate(blk_tensor, blk_offset, numels, BLOCK: tl.constexpr):
    """(tensor index, element offset, length) of this program's block."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    off = tl.load(blk_offset + pid)
    return t, off, tl.minimum(tl.load(numels + t) - off, BLOCK)


@triton.jit
def _start(ptrs, t, off, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(ptrs + t).to(tl.pointer_type(DTYPE)) + off
    if ALIGNED:
        # The host checked every base address is 16-byte aligned and BLOCK·size a multiple of
        # 16; without the hint an address read from memory is of unknown alignment (no v4).
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def lars_norms_kernel(blk_tensor, blk_offset, numels, w_ptrs, g_ptrs, part_ptr, wd_hi, wd_lo,
                      DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # Per block: part[2·pid] = Σ w², part[2·pid + 1] = Σ u², u = g + wd·w (u is not stored: the
    # update recomputes it from the w and g it reads anyway). No atomics: the per-tensor sums
    # are formed by lars_norms_finish_kernel in a fixed order, so a trust ratio is the same
    # to the last bit from run to run.
    t, off, n = _locate(blk_tensor, blk_offset, numels, BLOCK)
    w_p = _start(w_ptrs, t, off, DTYPE, ALIGNED)
    g_p = _start(g_ptrs, t, off, DTYPE, ALIGNED)
    idx = tl.arange(0, BLOCK)
    if n == BLOCK:  # all but the last block of a tensor: unmasked, so the loads vectorise
        w = tl.load(w_p + idx)
        g = tl.load(g_p + idx)
    else:
        mask = idx < n
        w = tl.load(w_p + idx, mask=mask, other=0.0)
        g = tl.load(g_p + idx, mask=mask, other=0.0)
    u = g + _scalar(wd_hi, wd_lo, DTYPE) * w
    pid = tl.program_id(0)
    tl.store(part_ptr + 2 * pid, tl.sum(w * w, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(u * u, axis=0))


@triton.jit
def lars_norms_finish_kernel(first_blk, numels, part_ptr, sq_ptr,
                             DTYPE: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    # Per tensor t (one program each): sq[2t], sq[2t + 1] = the sums of its blocks' partials,
    # RBLOCK lanes at a time, then across the lanes: the same order on every run.
    t = tl.program_id(0)
    first = tl.load(first_blk + t)
    n_blk = tl.cdiv(tl.load(numels + t), BLOCK)
    r = tl.arange(0, RBLOCK)
    acc_w = tl.zeros((RBLOCK,), DTYPE)
    acc_u = tl.zeros((RBLOCK,), DTYPE)
    for s in range(0, n_blk, RBLOCK):
        mask = s + r < n_blk
        at = part_ptr + 2 * (first + s + r)
        acc_w += tl.load(at, mask=mask, other=0.0)
        acc_u += tl.load(at + 1, mask=mask, other=0.0)
    tl.store(sq_ptr + 2 * t, tl.sum(acc_w, axis=0))
    tl.store(sq_ptr + 2 * t + 1, tl.sum(acc_u, axis=0))


@triton.jit
def _trust(sq_ptr, t, eta, DTYPE: tl.constexpr):
    # Correctly rounded sqrt and division, as PyTorch's (fp32 tl.sqrt and / are approximate;
    # fp64's are IEEE already, and the _rn forms take fp32 only).
    w_sq = tl.load(sq_ptr + 2 * t)
    u_sq = tl.load(sq_ptr + 2 * t + 1)
    if DTYPE == tl.float64:
        w_norm = tl.sqrt(w_sq)
        u_norm = tl.sqrt(u_sq)
    else:
        w_norm = tl.sqrt_rn(w_sq)
        u_norm = tl.sqrt_rn(u_sq)
    ok = (w_norm > 0) & (u_norm > 0)  # NaN fails too: trust 1, as the reference
    num = eta * w_norm
    den = tl.where(ok, u_norm, 1.0)
    if DTYPE == tl.float64:
        ratio = num / den
    else:
        ratio = tl.div_rn(num, den)
    return tl.where(ok, ratio, 1.0)


@triton.jit
def _step(w, g, b, sq_ptr, t, lr, m, wd, eta, DTYPE: tl.constexpr, ADAPT: tl.constexpr):
    if ADAPT:
        trust = _trust(sq_ptr, t, eta, DTYPE)
        b = m * b + trust * (g + wd * w)
    else:
        b = m * b + g
    return w - lr * b, b


@triton.jit
def lars_update_kernel(blk_tensor, blk_offset, numels, w_ptrs, g_ptrs, b_ptrs, sq_ptr,
                       lr_hi, lr_lo, m_hi, m_lo, wd_hi, wd_lo, eta_hi, eta_lo,
                       DTYPE: tl.constexpr, ADAPT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # buf ← m·buf + trust·(g + wd·w); w ← w − lr·buf (excluded tensors: trust 1, wd 0).
    t, off, n = _locate(blk_tensor, blk_offset, numels, BLOCK)
    w_p = _start(w_ptrs, t, off, DTYPE, ALIGNED)
    g_p = _start(g_ptrs, t, off, DTYPE, ALIGNED)
    b_p = _start(b_ptrs, t, off, DTYPE, ALIGNED)
    lr = _scalar(lr_hi, lr_lo, DTYPE)
    m = _scalar(m_hi, m_lo, DTYPE)
    wd = _scalar(wd_hi, wd_lo, DTYPE)
    eta = _scalar(eta_hi, eta_lo, DTYPE)
    idx = tl.arange(0, BLOCK)
    if n == BLOCK:
        w, b = _step(tl.load(w_p + idx), tl.load(g_p + idx), tl.load(b_p + idx), sq_ptr, t, lr, m, wd, eta,
                     DTYPE, ADAPT)
        tl.store(b_p + idx, b)
        tl.store(w_p + idx, w)
    else:
        mask = idx < n
        w, b = _step(tl.load(w_p + idx, mask=mask), tl.load(g_p + idx, mask=mask), tl.load(b_p + idx, mask=mask),
                     sq_ptr, t, lr, m, wd, eta, DTYPE, ADAPT)
        tl.store(b_p + idx, b, mask=mask)
        tl.store(w_p + idx, w, mask=mask)
