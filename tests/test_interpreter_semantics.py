"""The interpreter rounds and fuses as compiled code does (fastbyol_kernels._interpreter, applied
by conftest): the bf16/fp16 outputs of every kernel are tested bit for bit on that basis."""
import numpy as np
import torch
import triton
import triton.language as tl

from fastbyol_kernels._interpreter import bf16_bits_to_f32, f32_to_bf16_bits


@triton.jit
def _casts(x_ptr, bf_ptr, rtne_ptr, h_ptr, fma_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m)
    tl.store(bf_ptr + i, x.to(tl.bfloat16), mask=m)
    tl.store(rtne_ptr + i, x.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=m)
    tl.store(h_ptr + i, x.to(tl.float16), mask=m)
    k = tl.load(x_ptr + n - 1)  # a scalar from memory used as a loop bound: tensor.__index__
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(k.to(tl.int32)):
        acc += 1.0
    tl.store(fma_ptr + i, tl.fma(x, x, -(x * x)) + (acc - k), mask=m)  # acc - k: 0 if the loop ran k times


def test_casts_round_to_nearest_even_and_fma_is_fused():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, generator=g)
    # ties (exactly half a bf16 step) both ways, a carry into the exponent, inf, the loop bound
    x[:5] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 - 2 ** -9, float("inf"), -(1 + 2 ** -8)])
    x[-1] = 3.0
    bf, rtne = torch.empty(300, dtype=torch.bfloat16), torch.empty(300, dtype=torch.bfloat16)
    h, f = torch.empty(300, dtype=torch.float16), torch.empty(300)
    _casts[(1,)](x, bf, rtne, h, f, 300, BLOCK=512)
    assert torch.equal(bf, x.to(torch.bfloat16)) and torch.equal(rtne, x.to(torch.bfloat16))
    assert torch.equal(h, x.to(torch.float16))
    # fma(x, x, -fl(x·x)) is the rounding error of the product: 0 unfused, exact when fused
    want = (x.double() * x.double() - (x * x).double()).float()
    assert torch.equal(f[:-1][torch.isfinite(x[:-1])], want[:-1][torch.isfinite(x[:-1])])
    assert (f[5:-1] != 0).any()


def test_bit_helpers_match_torch():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(2)) * 1e3
    bits = f32_to_bf16_bits(x.numpy())
    assert np.array_equal(bits.view(np.int16), x.to(torch.bfloat16).view(torch.int16).numpy())
    assert np.array_equal(bf16_bits_to_f32(bits), x.to(torch.bfloat16).float().numpy())
