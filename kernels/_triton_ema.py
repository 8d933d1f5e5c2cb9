"""Triton kernel of the multi-tensor EMA (imported only when the fused path runs; see ema.py)."""
import triton
import triton.language as tl


@triton.jit
def ema_kernel(t_table, o_table, numels, blk_tensor, blk_offset, m_ptr, m_value,
               T_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, M_IS_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    # One program = one block of one tensor; the tensor's address comes from the pointer table.
    pid = tl.program_id(0)
    i = tl.load(blk_tensor + pid)
    off = tl.load(blk_offset + pid)
    n = tl.load(numels + i)
    t_ptr = tl.load(t_table + i).to(tl.pointer_type(T_DTYPE))
    o_ptr = tl.load(o_table + i).to(tl.pointer_type(O_DTYPE))
    if M_IS_TENSOR:
        m = tl.load(m_ptr).to(tl.float32)
    else:
        m = m_value
    idx = off + tl.arange(0, BLOCK)
    mask = idx < n
    t = tl.load(t_ptr + idx, mask=mask).to(tl.float32)
    o = tl.load(o_ptr + idx, mask=mask).to(tl.float32)
    tl.store(t_ptr + idx, m * t + (1.0 - m) * o, mask=mask)
