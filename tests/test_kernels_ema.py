"""Fused multi-tensor EMA (Triton under the interpreter) and ModuleEMA."""
import pytest
import torch
from torch import nn

from fastbyol_kernels import ModuleEMA, ema_update_
from fastbyol_kernels import ema as ema_mod

SIZES = [(1,), (7,), (1000,), (3, 5, 7), (4097,), (2, 2049)]


def _lists(n, t_dtype=torch.float32, o_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [SIZES[i % len(SIZES)] for i in range(n)]
    ts = [torch.randn(s, generator=g).to(t_dtype) for s in shapes]
    os_ = [torch.randn(s, generator=g).to(o_dtype) for s in shapes]
    return ts, os_


def _ref(ts, os_, m):
    return [(m * t.double() + (1 - m) * o.double()) for t, o in zip(ts, os_)]


@pytest.mark.parametrize("n", [1, 5, 200])
def test_matches_float64_reference(n):
    ts, os_ = _lists(n)
    expected = _ref(ts, os_, 0.996)
    ema_update_(ts, os_, 0.996, backend="triton")
    for t, e in zip(ts, expected):
        torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)


def test_one_launch_per_dtype_group(monkeypatch):
    calls = []
    real = ema_mod._get_kernel

    class Counting:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            calls.append(grid)
            return self.k[grid]

    monkeypatch.setattr(ema_mod, "_get_kernel", lambda: Counting(real()))
    ts, os_ = _lists(60)
    ema_update_(ts, os_, 0.5, backend="triton")
    assert len(calls) == 1
    bf, bo = _lists(3, torch.bfloat16, torch.float32, seed=1)
    ema_update_(ts + bf, os_ + bo, 0.5, backend="triton")
    assert len(calls) == 3  # one launch for each of the two dtype groups


@pytest.mark.parametrize("t_dtype,o_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_mixed_precision(t_dtype, o_dtype):
    ts, os_ = _lists(9, t_dtype, o_dtype)
    expected = _ref(ts, os_, 0.9)
    ema_update_(ts, os_, 0.9, backend="triton")
    for t, e in zip(ts, expected):
        assert t.dtype == t_dtype
        if t_dtype == torch.float32:
            torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)
        else:  # fp32 compute, one rounding to bf16: within one bf16 ulp (2^-7 relative)
            torch.testing.assert_close(t.double(), e, rtol=2 ** -7, atol=1e-6)


def test_momentum_one_and_zero_are_exact():
    ts, os_ = _lists(12)
    before = [t.clone() for t in ts]
    ema_update_(ts, os_, 1.0, backend="triton")
    assert all(torch.equal(t, b) for t, b in zip(ts, before))
    ema_update_(ts, os_, 0.0, backend="triton")
    assert all(torch.equal(t, o) for t, o in zip(ts, os_))


def test_tensor_momentum_and_every_element_written():
    ts, os_ = _lists(7)
    for t in ts:
        t.fill_(12345.0)  # poison: m = 0 must overwrite every element with the online
    ema_update_(ts, os_, torch.tensor(0.0), backend="triton")
    assert all(torch.equal(t, o) for t, o in zip(ts, os_))
    ts2, os2 = _lists(7, seed=4)
    expected = _ref(ts2, os2, 0.75)
    ema_update_(ts2, os2, torch.tensor(0.75), backend="triton")
    for t, e in zip(ts2, expected):
        torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)


def test_reference_backend_agrees():
    ts, os_ = _lists(20)
    ts2 = [t.clone() for t in ts]
    ema_update_(ts, os_, 0.97, backend="triton")
    ema_update_(ts2, os_, torch.tensor(0.97), backend="torch")
    for a, b in zip(ts, ts2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_repeated_calls_reuse_the_plan():
    ts, os_ = _lists(4)
    ema_mod._plans.clear()
    ema_update_(ts, os_, 0.5, backend="triton")
    ema_update_(ts, os_, 0.5, backend="triton")
    assert len(ema_mod._plans) == 1


def test_errors():
    ts, os_ = _lists(3)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(ts, [os_[0], os_[1], torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match="3 targets but 2"):
        ema_update_(ts, os_[:2], 0.5)
    with pytest.raises(ValueError, match="contiguous"):
        ema_update_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.5, backend="triton")


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ts, os_ = _lists(2)
    with pytest.raises(RuntimeError, match="CUDA"):
        ema_update_(ts, os_, 0.5, backend="triton")


def _net():
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


@pytest.mark.parametrize("mode", ["copy", "ema", "none"])
def test_module_ema_buffers(mode):
    torch.manual_seed(0)
    online, target = _net(), _net()
    online.train()(torch.randn(8, 5))  # move the online BN statistics
    t_before = {k: v.clone() for k, v in target.state_dict().items()}
    ModuleEMA(online, target, buffers=mode, backend="triton").update(0.9)
    o, t = online.state_dict(), target.state_dict()
    for k in t:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(t[k], o[k] if mode != "none" else t_before[k])
        elif "running" in k:
            want = {"copy": o[k], "ema": 0.9 * t_before[k] + 0.1 * o[k], "none": t_before[k]}[mode]
            torch.testing.assert_close(t[k], want)
        else:
            torch.testing.assert_close(t[k], 0.9 * t_before[k] + 0.1 * o[k])


def test_module_ema_mismatch_errors():
    with pytest.raises(ValueError, match="shape"):
        ModuleEMA(nn.Linear(5, 4), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="names differ"):
        ModuleEMA(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Identity(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="buffers must be"):
        ModuleEMA(nn.Linear(2, 2), nn.Linear(2, 2), buffers="average")
