"""Triton kernel of the multi-tensor EMA (imported only when the fused path runs; see ema.py)."""
import triton
import triton.language as tl


@triton.jit
def ema_kernel(t_blocks, o_blocks, blk_len, m_ptr, m_value,
               T_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, M_IS_TENSOR: tl.constexpr,
               ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
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
    if M_IS_TENSOR:  # read on device: no host sync, and a captured CUDA graph sees new values
        m = tl.load(m_ptr).to(tl.float32)
    else:
        m = m_value
    idx = tl.arange(0, BLOCK)
    if n == BLOCK:
        # Full block (all but at most one per tensor): unmasked, so the loads vectorise.
        t = tl.load(t_ptr + idx).to(tl.float32)
        o = tl.load(o_ptr + idx).to(tl.float32)
        # m·t + (1 − m)·o in fp32: m = 1 gives t and m = 0 gives o exactly (for finite t).
        tl.store(t_ptr + idx, (m * t + (1.0 - m) * o).to(T_DTYPE))
    else:
        mask = idx < n
        t = tl.load(t_ptr + idx, mask=mask).to(tl.float32)
        o = tl.load(o_ptr + idx, mask=mask).to(tl.float32)
        tl.store(t_ptr + idx, (m * t + (1.0 - m) * o).to(T_DTYPE), mask=mask)
