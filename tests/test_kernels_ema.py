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


# ----------------------------------------------------------------------------- exact momentum

MOMENTA = [0.3, 0.99, 0.996, 0.9999, 0.99999, 1 - 3e-8]


def _weight_of(m, backend):
    """The weight an update gives the online: from 0 toward 1, the result *is* the weight."""
    t = torch.zeros(5000)
    ema_update_([t], [torch.ones(5000)], m, backend=backend)
    assert torch.all(t == t[0])
    return t[0].item()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("m", MOMENTA)
def test_one_minus_m_is_formed_in_double(backend, m):
    # A float, and an fp64 tensor: the weight is fp32(1 − m) with 1 − m exact. (The old
    # kernel formed 1 − fp32(m): 1.7e-4 off at 0.9999, 100% off at 1 − 3e-8.)
    want = torch.tensor(1 - m, dtype=torch.float64).float().item()
    assert _weight_of(m, backend) == want
    assert _weight_of(torch.tensor(m, dtype=torch.float64), backend) == want
    m32 = torch.tensor(m, dtype=torch.float32)  # an fp32 tensor: 1 − m32 is exact for m32 ≥ 0.5
    assert _weight_of(m32, backend) == torch.tensor(1 - m32.double().item()).float().item()


def test_fp32_rounded_momentum_is_caught(monkeypatch):
    real = ema_mod.ema_launch

    def fp32_momentum(plan, momentum, *args):  # the old kernel: m rounded first, 1 − m from it
        launch = real(plan, momentum, *args)
        m32 = torch.tensor(momentum, dtype=torch.float32).item()
        launch.args.update(w_value=1.0 - m32)
        return launch

    monkeypatch.setattr(ema_mod, "ema_launch", fp32_momentum)
    with pytest.raises(AssertionError):
        test_one_minus_m_is_formed_in_double("triton", 0.9999)


@pytest.mark.parametrize("t_dtype,o_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_kernel_equals_lerp_bit_for_bit(t_dtype, o_dtype):
    # torch.lerp with weight 1 − m is what AveragedModel and timm run: the kernel computes its
    # fp32 value exactly (its fma, both branches) and rounds it once, to nearest even, as torch
    # does; conftest makes the interpreter round bf16 like compiled code, so this is the GPU's result.
    from conftest import COMPILED_SEMANTICS

    assert COMPILED_SEMANTICS, "the interpreter's casts are not patched: bf16 outputs cannot be checked bit for bit"
    ts, os_ = _lists(6, t_dtype, o_dtype, seed=5)
    for m in (0.2, 0.9, 0.9999):
        want = [t.float().lerp(o.float(), 1 - m).to(t_dtype) for t, o in zip(ts, os_)]
        if t_dtype == o_dtype:
            same = [t.clone() for t in ts]
            torch._foreach_lerp_(same, os_, 1 - m)  # the in-dtype lerp timm runs: the same values
            assert all(torch.equal(a, b) for a, b in zip(same, want))
        for mm in (m, torch.tensor(m, dtype=torch.float64)):
            got = [t.clone() for t in ts]
            ema_update_(got, os_, mm, backend="triton")
            for g, w in zip(got, want):
                assert torch.equal(g, w), f"{(g != w).sum().item()} of {g.numel()} elements differ (m={m})"


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_reference_agrees_with_lerp(t_dtype):
    ts, os_ = _lists(6, t_dtype, t_dtype, seed=5)
    for m in (0.2, 0.9999):
        want = [t.clone() for t in ts]
        torch._foreach_lerp_(want, os_, 1 - m)
        got = [t.clone() for t in ts]
        ema_update_(got, os_, m, backend="torch")
        assert all(torch.equal(g, w) for g, w in zip(got, want))


# ----------------------------------------------------------------------------- plan cache

def test_plan_cache_keys_on_strides():
    # Same addresses, sizes and dtypes, another pairing: a transposed target against a
    # contiguous online must not reuse the contiguous plan (it pairs by memory position).
    g = torch.Generator().manual_seed(6)
    t, o = torch.randn(33, 17, generator=g), torch.randn(33, 17, generator=g)
    ema_update_([t], [o], 1.0, backend="triton")  # caches the contiguous plan (m = 1: no change)
    tt, ov = t.t(), o.view(17, 33)
    want = 0.5 * tt.double() + 0.5 * ov.double()
    ema_update_([tt], [ov], 0.5, backend="triton")
    torch.testing.assert_close(tt.double(), want, rtol=1e-6, atol=1e-7)


def test_stride_blind_cache_is_caught(monkeypatch):
    old_key = lambda ts, os_: (tuple(map(torch.Tensor.data_ptr, ts)), tuple(map(torch.Tensor.data_ptr, os_)),  # noqa
                               tuple(map(torch.Tensor.numel, ts)), tuple(t.dtype for t in ts + os_))
    monkeypatch.setattr(ema_mod, "plan_key", old_key)
    ema_mod._plans.clear()
    with pytest.raises(AssertionError):
        test_plan_cache_keys_on_strides()
    ema_mod._plans.clear()


def test_plan_cache_keys_on_shape_of_the_online():
    t, o = torch.zeros(4, 6), torch.ones(4, 6)
    ema_update_([t], [o], 0.5, backend="triton")
    with pytest.raises(ValueError, match="shape"):
        ema_update_([t], [o.view(6, 4)], 0.5, backend="triton")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("m", [-0.1, 1.5, float("nan"), float("inf")])
def test_momentum_outside_unit_interval_raises_and_leaves_targets(backend, m):
    ts, os_ = _lists(3)
    before = [t.clone() for t in ts]
    for mm in (m, torch.tensor(m), torch.tensor(m, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            ema_update_(ts, os_, mm, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(ts, before))


def test_device_momentum_out_of_range_is_a_no_op_in_the_kernel(monkeypatch):
    # On CUDA the value is not read on the host; the kernel then leaves the targets alone.
    # Simulated here by skipping the host check that CPU tensors get.
    monkeypatch.setattr(ema_mod, "_check_value", lambda m: None)
    ts, os_ = _lists(3)
    before = [t.clone() for t in ts]
    for m in (-0.5, 2.0, float("nan")):
        ema_update_(ts, os_, torch.tensor(m, dtype=torch.float64), backend="triton")
        assert all(torch.equal(t, b) for t, b in zip(ts, before))


def test_bad_input_is_refused_before_anything_is_written():
    ts, os_ = _lists(4)
    before = [t.clone() for t in ts]
    with pytest.raises(ValueError, match="tensor 3: target shape"):
        ema_update_(ts, os_[:3] + [torch.zeros(1)], 0.5, backend="triton")
    with pytest.raises(ValueError, match="tensor 2: the target is the online tensor itself"):
        ema_update_(ts, os_[:2] + [ts[2], os_[3]], 0.5, backend="triton")
    with pytest.raises(ValueError, match="tensor 1 is not floating point"):
        ema_update_(ts[:1] + [torch.zeros(7, dtype=torch.int64)], os_[:1] + [torch.zeros(7, dtype=torch.int64)], 0.5)
    with pytest.raises(ValueError, match="1-element floating"):
        ema_update_(ts, os_, torch.tensor(1), backend="triton")
    assert all(torch.equal(t, b) for t, b in zip(ts, before))


# ----------------------------------------------------------------------------- stochastic rounding

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stochastic_rounding_accumulates_small_updates(backend):
    # A bf16 target at 1.0 moving toward 1.05 at m = 0.999: nearest rounding never moves
    # (the step, 5e-5, is under half a bf16 ulp), stochastic rounding does, unbiased.
    n, steps = 4096, 20
    o = torch.full((n,), 1.05, dtype=torch.bfloat16)
    nearest, stochastic = torch.ones(n, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)
    exact = 1.0
    for s in range(steps):
        ema_update_([nearest], [o], 0.999, backend=backend)
        ema_update_([stochastic], [o], 0.999, backend=backend, stochastic_rounding=True, seed=s)
        exact = 0.999 * exact + 0.001 * o[0].double().item()
    assert torch.all(nearest == 1.0)
    values = set(stochastic.double().unique().tolist())
    assert values <= {1.0 + k * 2 ** -7 for k in range(4)} and len(values) > 1
    # mean moved by ~9.7e-4 (exact - 1); sd of the mean ~ 2^-7·sqrt(p)/sqrt(n) ≈ 1.2e-5
    assert abs(stochastic.double().mean().item() - exact) < 8e-5


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_stochastic_rounding_is_seeded_and_keeps_specials():
    # (an infinite target gives NaN, as torch.lerp does: inf + w·(o − inf))
    x = torch.tensor([1.0, float("nan"), -1.0] * 100, dtype=torch.bfloat16)
    o = torch.tensor([1.05, 1.05, 1.05, float("inf"), 1.05, float("-inf")] * 50, dtype=torch.bfloat16)
    a, b, c = x.clone(), x.clone(), x.clone()
    ema_update_([a], [o], 0.9, backend="triton", stochastic_rounding=True, seed=3)
    ema_update_([b], [o], 0.9, backend="triton", stochastic_rounding=True, seed=3)
    ema_update_([c], [o], 0.9, backend="triton", stochastic_rounding=True, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(a[::3], c[::3])
    assert torch.all(a[1::3].isnan())
    assert torch.all(a[3::6] == float("inf")) and torch.all(a[5::6] == float("-inf"))
    neg = a[2::6].double()  # -0.9 + 0.105 = -0.795: bf16 neighbours only
    assert set(neg.unique().tolist()) <= {-0.79296875, -0.796875}


def test_stochastic_rounding_only_for_bf16_targets():
    ts, os_ = _lists(3, torch.float32, torch.float32)
    ts2 = [t.clone() for t in ts]
    ema_update_(ts, os_, 0.9, backend="triton", stochastic_rounding=True, seed=1)
    ema_update_(ts2, os_, 0.9, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(ts, ts2))


# ----------------------------------------------------------------------------- ModuleEMA binding

def test_module_ema_follows_rebound_tensors():
    torch.manual_seed(2)
    online, target = _net(), _net()
    ema = ModuleEMA(online, target, buffers="copy", backend="triton")
    ema.update(0.5)
    # load_state_dict(assign=True) re-binds every parameter and buffer of the target
    target.load_state_dict({k: v.clone() for k, v in _net().state_dict().items()}, assign=True)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    online.train()(torch.randn(8, 5))
    ema.update(0.5)
    for k, v in target.state_dict().items():
        o = online.state_dict()[k]
        want = o if "running" in k or "num_batches" in k else 0.5 * fresh[k] + 0.5 * o
        torch.testing.assert_close(v, want)
    # .to() replaces buffers; a replaced submodule shows too
    online.to(torch.float32)
    online[2] = nn.Linear(4, 3)
    ema.update(0.0)
    assert all(torch.equal(v, online.state_dict()[k]) for k, v in target.state_dict().items())


def test_module_ema_rebinding_is_what_the_test_sees(monkeypatch):
    monkeypatch.setattr(ModuleEMA, "_rebound", lambda self: False)  # the old behaviour: bound once
    with pytest.raises(AssertionError):
        test_module_ema_follows_rebound_tensors()


class DeepSpeedEngine(nn.Module):  # the class name is what unwrap looks for (no deepspeed import)
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_module_ema_unwraps_ddp_compile_and_deepspeed():
    import torch.distributed as dist

    torch.manual_seed(3)
    online, target = _net(), _net()
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(online)
        # names differ by the wrappers' prefixes (module., _orig_mod.): pairing looks through them
        for a, b in ((ddp, target), (target, torch.compile(online)), (DeepSpeedEngine(torch.compile(online)), target)):
            before = {k: v.clone() for k, v in fk_unwrap(b).state_dict().items()}
            ModuleEMA(a, b, backend="triton").update(0.25)
            src = fk_unwrap(a).state_dict()
            for k, v in fk_unwrap(b).state_dict().items():
                if v.is_floating_point() and "running" not in k:
                    torch.testing.assert_close(v, 0.25 * before[k] + 0.75 * src[k])
            target, online = online, target  # and the other way round
    finally:
        if own_group:
            dist.destroy_process_group()


def fk_unwrap(m):
    from fastbyol_kernels import unwrap

    return unwrap(m)


def test_module_ema_bad_pairs():
    net = _net()
    with pytest.raises(ValueError, match="target is the online module itself"):
        ModuleEMA(net, net)
    with pytest.raises(ValueError, match="target is the online module itself"):
        ModuleEMA(torch.compile(net), net)
    shared = _net()
    shared[0].weight = net[0].weight
    with pytest.raises(ValueError, match="parameter '0.weight' is the same tensor"):
        ModuleEMA(net, shared)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    a.weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="parameter 'weight' is not floating point"):
        ModuleEMA(a, b)
