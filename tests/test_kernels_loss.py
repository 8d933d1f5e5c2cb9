"""Fused BYOL loss (Triton, under the interpreter on CPU) against a float64 reference."""
import pytest
import torch

from fastbyol_kernels import byol_loss, normalized_l2_loss

EPS = 1e-12
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}


def ref_rows(p, z):
    """float64 ``2 − 2·cos`` with F.normalize's max(‖x‖, eps)."""
    p, z = p.double(), z.double()
    pn = p / p.norm(dim=1, keepdim=True).clamp_min(EPS)
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
    return 2 - 2 * (pn * zn).sum(1)


def ref_byol(p1, p2, z1, z2):
    return (ref_rows(p1, z2) + ref_rows(p2, z1)).mean()


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
    p1, p2, z1, z2 = _inputs(4, 9, torch.float32)
    with torch.no_grad():
        p1[0].zero_()
        z2[1].zero_()
        p2[2].fill_(1e-14)  # below eps: F.normalize divides by eps, not by the norm
    _check_byol([p1, p2, z1, z2], torch.float32)
    rows = normalized_l2_loss(p1.detach(), z2.detach(), backend="triton")
    assert rows[0].item() == pytest.approx(2.0) and rows[1].item() == pytest.approx(2.0)


def test_non_contiguous_inputs():
    base = torch.randn(2 * 257, 300)
    p1 = base[::2].requires_grad_()  # row stride 600
    p2 = torch.randn(300, 257).t().requires_grad_()  # column-major
    z1, z2 = torch.randn(257, 600)[:, ::2], torch.randn(257, 300)
    assert not p1.is_contiguous() and not p2.is_contiguous() and not z1.is_contiguous()
    loss = byol_loss(p1, p2, z1, z2, backend="triton")
    loss.backward()
    ref_in = [x.detach().double().requires_grad_() for x in (p1, p2)]
    ref_byol(*ref_in, z1, z2).backward()
    torch.testing.assert_close(p1.grad.double(), ref_in[0].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p2.grad.double(), ref_in[1].grad, rtol=1e-5, atol=1e-7)


def test_every_gradient_element_written():
    # Gradients come from torch.empty: a skipped element would hold garbage, so compare all.
    torch.manual_seed(3)
    xs = _inputs(67, 129, torch.float32)
    byol_loss(*xs, backend="triton").backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    _check_byol(_inputs(67, 129, torch.float32, seed=5), torch.float32)


def test_backends_agree_and_errors():
    xs = [x.detach() for x in _inputs(5, 16, torch.float32)]
    torch.testing.assert_close(byol_loss(*xs, backend="triton"), byol_loss(*xs, backend="torch"))
    with pytest.raises(ValueError, match="backend"):
        byol_loss(*xs, backend="cuda")
    with pytest.raises(ValueError, match="one shape"):
        byol_loss(xs[0], xs[1][:3], xs[2], xs[3], backend="torch")


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xs = [x.detach() for x in _inputs(2, 4, torch.float32)]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        byol_loss(*xs, backend="triton")
    torch.testing.assert_close(byol_loss(*xs), ref_byol(*xs).float())  # auto falls back to the reference
