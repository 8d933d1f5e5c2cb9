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
                                             (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.float16, torch.float16)])
def test_mixed_precision(t_dtype, o_dtype):
    ts, os_ = _lists(9, t_dtype, o_dtype)
    expected = _ref(ts, os_, 0.9)
    ema_update_(ts, os_, 0.9, backend="triton")
    for t, e in zip(ts, expected):
        assert t.dtype == t_dtype
        if t_dtype == torch.float32:
            torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)
        else:  # fp32 compute, one rounding: within half an ulp (bf16 2^-8, fp16 2^-11 relative)
            ulp = 2 ** -7 if t_dtype == torch.bfloat16 else 2 ** -10
            torch.testing.assert_close(t.double(), e, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("t_dtype,o_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("tensor_momentum", [False, True])
def test_momentum_one_and_zero_are_exact(backend, t_dtype, o_dtype, tensor_momentum):
    ts, os_ = _lists(12, t_dtype, o_dtype)
    before = [t.clone() for t in ts]
    m = (lambda v: torch.tensor(v)) if tensor_momentum else (lambda v: v)
    ema_update_(ts, os_, m(1.0), backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(ts, before))
    ema_update_(ts, os_, m(0.0), backend=backend)
    assert all(torch.equal(t, o.to(t_dtype)) for t, o in zip(ts, os_))


def test_tensor_momentum_and_every_element_written():
    ts, os_ = _lists(7)
    for t in ts:
        t.fill_(12345.0)  # poison: m = 0 must overwrite every element with the online
    ema_update_(ts, os_, torch.tensor(0.0), backend="triton")
    assert all(torch.equal(t, o) for t, o in zip(ts, os_))
    ts2, os2 = _lists(7, seed=4)
    expected = _ref(ts2, os2, 0.75)
    m = torch.tensor(0.75)
    ema_update_(ts2, os2, m, backend="triton")
    assert m.item() == 0.75
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
        ema_update_(ts, [os_[0], os_[1], torch.zeros(2)], 0.5, backend="triton")
    with pytest.raises(ValueError, match="3 targets but 2"):
        ema_update_(ts, os_[:2], 0.5)
    with pytest.raises(ValueError, match="1-element"):
        ema_update_(ts, os_, torch.full((2,), 0.5), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ema_update_(ts, os_, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="floating"):
        ema_update_([torch.zeros(3, dtype=torch.int64)], [torch.zeros(3, dtype=torch.int64)], 0.5, backend="triton")
    with pytest.raises(ValueError, match="takes fp32, bf16, fp16"):
        ema_update_([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)], 0.5,
                    backend="triton")


def test_non_contiguous_layouts_and_float64(monkeypatch):
    # channels_last conv weights (the trainer's memory format) and matching transposes are
    # dense: the kernel walks them in memory order, where target and online agree. A pair of
    # different layouts, a strided view and (under auto) fp64 go to the reference instead.
    calls = []
    real_reference = ema_mod._reference_
    monkeypatch.setattr(ema_mod, "_reference_", lambda ts, os_, *args: calls.append(len(ts)) or
                        real_reference(ts, os_, *args))
    g = torch.Generator().manual_seed(2)
    cl = [torch.randn(8, 3, 3, 5, generator=g).to(memory_format=torch.channels_last) for _ in range(2)]
    tr = [torch.randn(33, 17, generator=g).t() for _ in range(2)]
    mixed = [torch.randn(17, 33, generator=g).t(), torch.randn(33, 17, generator=g)]
    strided = [torch.randn(20, 30, generator=g)[:, ::3] for _ in range(2)]
    f64 = [torch.randn(40, generator=g, dtype=torch.float64) for _ in range(2)]
    ts, os_ = [cl[0], tr[0], mixed[0], strided[0], f64[0]], [cl[1], tr[1], mixed[1], strided[1], f64[1]]
    expected = _ref(ts, os_, 0.8)
    ema_update_(ts, os_, 0.8, backend="auto")
    for t, e in zip(ts, expected):
        torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)
    assert calls == [3]  # one reference call for the three the kernel cannot take


def test_unaligned_and_empty_tensors():
    # Views starting one element into their storage cannot use the aligned (vector) path.
    g = torch.Generator().manual_seed(3)
    tb, ob = torch.randn(9000, generator=g), torch.randn(9000, generator=g)
    ts = [tb[1:4098], tb[5000:5007], torch.randn(4096, generator=g), torch.zeros(0)]
    os_ = [ob[3:4100], ob[6000:6007], torch.randn(4096, generator=g), torch.zeros(0)]
    expected = _ref(ts, os_, 0.3)
    ema_update_(ts, os_, 0.3, backend="triton")
    for t, e in zip(ts, expected):
        torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-7)
    assert tb[0].item() == torch.randn(9000, generator=torch.Generator().manual_seed(3))[0].item()  # untouched
    ema_update_([], [], 0.5, backend="triton")


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
    with pytest.raises(ValueError, match=r"parameter 'weight': online shape \(4, 5\) != target \(3, 5\)"):
        ModuleEMA(nn.Linear(5, 4), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="online has '0.weight', target has '1.weight'"):
        ModuleEMA(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Identity(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="online has none, target has '1.weight'"):
        ModuleEMA(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="buffer names differ .* online has '1.running_mean', target has none"):
        ModuleEMA(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)),
                  nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)))
    with pytest.raises(ValueError, match="buffers must be"):
        ModuleEMA(nn.Linear(2, 2), nn.Linear(2, 2), buffers="average")


def test_module_ema_mixed_precision_online():
    # e.g. a bf16 online copy (pure-bf16 training) averaged into an fp32 target.
    torch.manual_seed(1)
    online, target = _net().to(torch.bfloat16), _net()
    t_before = {k: v.clone() for k, v in target.state_dict().items()}
    ModuleEMA(online, target, buffers="ema", backend="triton").update(torch.tensor(0.5))
    for k, o in online.state_dict().items():
        want = o if not o.is_floating_point() else 0.5 * t_before[k] + 0.5 * o.float()
        torch.testing.assert_close(target.state_dict()[k], want, rtol=1e-6, atol=1e-7)
