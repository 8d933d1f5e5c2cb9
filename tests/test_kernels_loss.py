"""Fused BYOL loss (Triton, under the interpreter on CPU) against a float64 reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastbyol_kernels import byol_loss, normalized_l2_loss
from fastbyol_kernels.check import EPS, TOL, ref_byol, ref_rows  # noqa: F401  (the one float64 reference)


def _inputs(B, D, dtype, n=4, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else B * 1000 + D)
    return [torch.randn(B, D, generator=g).to(dtype).requires_grad_() for _ in range(n)]


def _check_byol(xs, dtype, grads_for=(0, 1, 2, 3)):
    for i, x in enumerate(xs):
        x.requires_grad_(i in grads_for)
    loss = byol_loss(*xs, backend="triton")
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    ref_in = [x.detach().double().requires_grad_(i in grads_for) for i, x in enumerate(xs)]
    ref = ref_byol(*ref_in)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, **TOL[dtype])
    for i, (x, r) in enumerate(zip(xs, ref_in)):
        if i in grads_for:
            assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
            # Per row, relative to the size of the two terms the gradient is the difference of,
            # 2/(B·‖x‖): with D = 1 the exact gradient is 0 and only their rounding remains.
            B = x.shape[0]
            terms = 2.0 / B / x.detach().double().norm(dim=1, keepdim=True).clamp_min(1e-6)
            scale = torch.maximum(r.grad.abs().amax(1, keepdim=True), terms)
            torch.testing.assert_close(x.grad.double() / scale, r.grad / scale, **TOL[dtype])
        else:
            assert x.grad is None


@pytest.mark.parametrize("B", [1, 3, 257])
@pytest.mark.parametrize("D", [1, 7, 256, 1000])
def test_byol_loss_fp32(B, D):
    _check_byol(_inputs(B, D, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D", [(1, 7), (3, 1000), (257, 256), (3, 1)])
def test_byol_loss_low_precision(dtype, B, D):
    _check_byol(_inputs(B, D, dtype), dtype)


@pytest.mark.parametrize("dtype,B,D", [(torch.float32, 2, 8192), (torch.bfloat16, 3, 5000)])
def test_wide_features_loop_over_slabs(dtype, B, D):
    _check_byol(_inputs(B, D, dtype), dtype)


def test_only_predictions_get_gradients():
    _check_byol(_inputs(5, 33, torch.float32), torch.float32, grads_for=(0, 1))


@pytest.mark.parametrize("D", [1, 7, 256, 1000])
def test_pair_loss_rows_and_gradients(D):
    p, z = _inputs(3, D, torch.float32, n=2)
    rows = normalized_l2_loss(p, z, backend="triton")
    w = torch.randn(3, dtype=torch.float64)
    (rows * w.float()).sum().backward()
    p64, z64 = p.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    ref = ref_rows(p64, z64)
    (ref * w).sum().backward()
    assert rows.shape == (3,)
    torch.testing.assert_close(rows.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_zero_and_tiny_rows_follow_normalize_eps():
    p1, p2, z1, z2 = _inputs(5, 9, torch.float32)
    with torch.no_grad():
        p1[0].zero_()
        z2[1].zero_()
        p2[2].fill_(1e-14)  # norm 3e-14 < eps: F.normalize divides by eps, not by the norm
        z1[3].fill_(1e-12)  # norm 3e-12 >= eps: the ordinary quotient, tiny but unclamped
    _check_byol([p1, p2, z1, z2], torch.float32)
    rows = normalized_l2_loss(p1.detach(), z2.detach(), backend="triton")
    assert rows[0].item() == 2.0 and rows[1].item() == 2.0
    assert all(torch.isfinite(x.grad).all() for x in (p1, p2, z1, z2))


def test_pair_loss_zero_row_gradient():
    p, z = _inputs(3, 7, torch.float32, n=2)
    with torch.no_grad():
        p[1].zero_()
    normalized_l2_loss(p, z, backend="triton").sum().backward()
    p64, z64 = p.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    ref_rows(p64, z64).sum().backward()
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_mixed_input_dtypes():
    # bf16 predictions against fp32 targets: each gradient comes back in its input's dtype.
    p1, p2 = [x.to(torch.bfloat16).detach().requires_grad_() for x in _inputs(6, 40, torch.float32, n=2)]
    z1, z2 = _inputs(6, 40, torch.float32, n=2, seed=9)
    _check_byol([p1, p2, z1, z2], torch.bfloat16)


def test_non_contiguous_inputs():
    base = torch.randn(2 * 257, 300)
    p1 = base[::2].requires_grad_()  # row stride 600
    p2 = torch.randn(300, 257).t().requires_grad_()  # column-major
    z1 = torch.randn(257, 600)[:, ::2]  # column stride 2
    z2 = torch.randn(1, 300).expand(257, 300)  # row stride 0
    assert not any(x.is_contiguous() for x in (p1, p2, z1, z2))
    loss = byol_loss(p1, p2, z1, z2, backend="triton")
    loss.backward()
    ref_in = [x.detach().double().requires_grad_() for x in (p1, p2)]
    ref = ref_byol(*ref_in, z1, z2)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1.grad.double(), ref_in[0].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p2.grad.double(), ref_in[1].grad, rtol=1e-5, atol=1e-7)


def test_every_output_element_written(monkeypatch):
    # Poison every buffer the kernels allocate (saved sums, row losses, gradients) with NaN:
    # an element the kernels skip would survive into the results.
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    xs = _inputs(67, 129, torch.float32)
    _check_byol(xs, torch.float32)
    p, z = _inputs(67, 129, torch.float32, n=2, seed=5)
    rows = normalized_l2_loss(p, z, backend="triton")
    rows.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(p.grad).all() and torch.isfinite(z.grad).all()


def test_backends_agree_and_errors():
    xs = [x.detach() for x in _inputs(5, 16, torch.float32)]
    torch.testing.assert_close(byol_loss(*xs, backend="triton"), byol_loss(*xs, backend="torch"))
    with pytest.raises(ValueError, match="backend"):
        byol_loss(*xs, backend="cuda")
    with pytest.raises(ValueError, match="one shape"):
        byol_loss(xs[0], xs[1][:3], xs[2], xs[3], backend="torch")
    x64 = [x.double() for x in xs]  # the kernel lacks fp64: auto takes the reference, triton says so
    torch.testing.assert_close(byol_loss(*x64), ref_byol(*x64).float())
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        byol_loss(*x64, backend="triton")


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xs = [x.detach() for x in _inputs(2, 4, torch.float32)]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        byol_loss(*xs, backend="triton")
    torch.testing.assert_close(byol_loss(*xs), ref_byol(*xs).float())  # auto falls back to the reference


def test_works_without_triton():
    # A fresh interpreter where ``import triton`` fails: the package imports, the references
    # run (auto falls back), and backend="triton" says what is missing.
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None
        import torch
        import fastbyol_kernels as k
        xs = [torch.randn(3, 8) for _ in range(4)]
        assert k.byol_loss(*xs).shape == ()
        k.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5)
        for call in (lambda: k.byol_loss(*xs, backend="triton"),
                     lambda: k.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5, backend="triton")):
            try:
                call()
            except RuntimeError as e:
                assert "triton" in str(e), e
            else:
                raise AssertionError("no error")
        assert "triton" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("two_pairs", [True, False])
def test_low_precision_gradients_are_the_fp32_ones_rounded_to_nearest_even(dtype, two_pairs):
    # The kernel computes in fp32 from the upcast inputs and rounds each gradient once: so the
    # low-precision gradients are, bit for bit, torch's rounding of the gradients the kernel
    # computes from the same values in fp32 (a truncating cast, the interpreter's own, fails).
    from conftest import COMPILED_SEMANTICS

    assert COMPILED_SEMANTICS
    low = _inputs(5, 37, dtype, seed=3)
    high = [x.detach().float().requires_grad_() for x in low]
    for xs in (low, high):
        if two_pairs:
            byol_loss(*xs, backend="triton").backward()
        else:
            (normalized_l2_loss(xs[0], xs[2], backend="triton") * torch.arange(1.0, 6.0)).sum().backward()
    for lo, hi in zip(low, high):
        if hi.grad is not None:
            assert lo.grad.dtype == dtype
            assert torch.equal(lo.grad, hi.grad.to(dtype)), f"{(lo.grad != hi.grad.to(dtype)).sum().item()} differ"
