"""Triton kernel of the multi-tensor EMA (imported only when the fused path runs; see ema.py,
whose ``ema_launch`` builds every launch: grid, arguments, constexprs, num_warps)."""
import triton
import triton.language as tl


# The seed changes every call: unspecialised, so its value (1, a multiple of 16) never recompiles.
@triton.jit(do_not_specialize=["seed"])
def ema_kernel(t_blocks, o_blocks, blk_len, m_ptr, w_value, seed,
               T_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, M_IS_TENSOR: tl.constexpr,
               ALIGNED: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    # One program = one block of one tensor. The block table holds the block's own start
    # addresses (tensor address + offset), so the three table loads are independent of each
    # other: no chain of dependent loads before the data can be requested.
    pid = tl.program_id(0)
    t_ptr = tl.load(t_blocks + pid).to(tl.pointer_type(T_DTYPE))
    o_ptr = tl.load(o_blocks + pid).to(tl.pointer_type(O_DTYPE))
    n = tl.load(blk_len + pid)
    if ALIGNED:
        # The host checked that every address is 16-byte aligned; without this hint addresses
        # read from memory are of unknown alignment and the loads stay 4 bytes wide.
        t_ptr = tl.multiple_of(t_ptr, 16)
        o_ptr = tl.multiple_of(o_ptr, 16)
    if M_IS_TENSOR:
        # Read on device: no host sync, and a captured CUDA graph sees new values. 1 − m is
        # formed in fp64 (exact for an fp32 m, and for an fp64 m the fp32 value of the exact
        # 1 − m), so a τ near 1 keeps its weight: fp32 1 − m would be quantised to 6e-8 steps.
        m64 = tl.load(m_ptr).to(tl.float64)
        if (m64 < 0.0) | (m64 > 1.0) | (m64 != m64):
            return  # outside [0, 1] or NaN: leave the target untouched (the host cannot check)
        w = (1.0 - m64).to(tl.float32)
    else:
        w = w_value  # the host formed 1 − m in double: w_value = fp32(1 − m)
    idx = tl.arange(0, BLOCK)
    if n == BLOCK:
        # Full block (all but at most one per tensor): unmasked, so the loads vectorise.
        t = tl.load(t_ptr + idx).to(tl.float32)
        o = tl.load(o_ptr + idx).to(tl.float32)
        tl.store(t_ptr + idx, _round(_lerp(t, o, w), seed, pid, idx, T_DTYPE, STOCHASTIC, BLOCK))
    else:
        mask = idx < n
        t = tl.load(t_ptr + idx, mask=mask).to(tl.float32)
        o = tl.load(o_ptr + idx, mask=mask).to(tl.float32)
        tl.store(t_ptr + idx, _round(_lerp(t, o, w), seed, pid, idx, T_DTYPE, STOCHASTIC, BLOCK), mask=mask)


@triton.jit
def _lerp(t, o, w):
    # torch.lerp exactly (what AveragedModel and timm's ModelEmaV3 run, on CPU and CUDA alike):
    # fma(w, o − t, t) for a small weight, fma(w − 1, o − t, o) otherwise, with w the fp32
    # weight; the explicit fma keeps that rounding whether or not the compiler would contract.
    # m = 1 leaves t and m = 0 gives o exactly. (w − 1 is exact for w ≥ 0.5.)
    d = o - t
    return tl.where(w < 0.5, tl.fma(w, d, t), tl.fma(w - 1.0, d, o))


@triton.jit
def _round(x, seed, pid, idx, T_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    if STOCHASTIC:
        # bf16 stochastic rounding (as timm's ModelEmaV3): add 16 random bits below the bf16
        # mantissa, then truncate, so x rounds away from zero with probability equal to the
        # discarded fraction and small updates accumulate in expectation. Inf/NaN round plainly.
        r = tl.randint(seed, pid * BLOCK + idx).to(tl.uint32) & 0xFFFF
        bits = x.to(tl.uint32, bitcast=True)
        sr = ((bits + r) & 0xFFFF0000).to(tl.float32, bitcast=True)
        finite = tl.abs(x) < float("inf")
        return tl.where(finite, sr, x).to(T_DTYPE)
    else:
        return x.to(T_DTYPE)
