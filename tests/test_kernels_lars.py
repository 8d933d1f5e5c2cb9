"""Multi-tensor LARS kernels (Triton under the interpreter) against fastbyol's foreach LARS."""
import pytest
import torch
from torch import nn

from fastbyol.host_sync import record_host_syncs
from fastbyol.optim import LARS, param_groups
from fastbyol_kernels import launches
from fastbyol_kernels import lars as lars_mod
from fastbyol_kernels.lars import lars_step_, lars_step_reference_


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 256 / 128 elements: the 2257-element weight spans 9 / 18 programs, whose
    partial sums the finishing kernel adds 4 at a time (3 / 5 turns of its loop)."""
    monkeypatch.setattr(lars_mod, "_block_for", lambda dtype: {torch.float32: 256, torch.float64: 128}[dtype])
    monkeypatch.setattr(launches, "LARS_RBLOCK", 4)


HYPER = dict(lr=0.7, momentum=0.9, weight_decay=1e-2, trust_coefficient=1e-3)


class Awkward(nn.Module):
    """Weights of awkward sizes (one spanning several kernel blocks, one channels_last, one
    all-zero: trust ratio 1) and excluded biases and norm parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)  # 135-element weight, stored channels_last below
        self.bn = nn.BatchNorm2d(5)
        self.big = nn.Linear(61, 37)  # 2257 elements: several blocks
        self.zero = nn.Linear(7, 3, bias=False)
        self.conv.weight.data = self.conv.weight.data.contiguous(memory_format=torch.channels_last)
        nn.init.zeros_(self.zero.weight)


def _pair(dtype, backend_a="triton", backend_b="torch", seed=0):
    torch.manual_seed(seed)
    a = Awkward().to(dtype)
    b = Awkward().to(dtype)
    b.load_state_dict(a.state_dict())
    b.conv.weight.data = b.conv.weight.data.contiguous(memory_format=torch.channels_last)
    opts = [LARS(param_groups(m, HYPER["weight_decay"]), lr=HYPER["lr"], momentum=HYPER["momentum"],
                 trust_coefficient=HYPER["trust_coefficient"], backend=be)
            for m, be in ((a, backend_a), (b, backend_b))]
    return (a, b), opts


def _steps(nets, opts, n=3):
    for step in range(n):
        g = torch.Generator().manual_seed(step)
        for opt in opts:
            opt.zero_grad(set_to_none=True)  # new gradient tensors each step: their addresses move
        for pa, pb in zip(*(net.parameters() for net in nets)):
            grad = torch.randn(pa.shape, generator=g, dtype=pa.dtype) * (0 if step == 1 and pa.ndim == 1 else 1)
            pa.grad = grad.clone().contiguous(memory_format=torch.channels_last) if pa.ndim == 4 else grad.clone()
            pb.grad = grad.clone().contiguous(memory_format=torch.channels_last) if pb.ndim == 4 else grad.clone()
        for opt in opts:
            opt.step()


def test_float64_equals_the_foreach_lars():
    nets, opts = _pair(torch.float64)
    _steps(nets, opts)
    for (name, pa), pb in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-13, atol=1e-15, msg=name)
        torch.testing.assert_close(opts[0].state[pa]["momentum_buffer"], opts[1].state[pb]["momentum_buffer"],
                                   rtol=1e-13, atol=1e-15, msg=name)


def test_float32_close_to_the_foreach_lars():
    nets, opts = _pair(torch.float32)
    _steps(nets, opts)
    for (name, pa), pb in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=2e-6, atol=2e-7, msg=name)


def test_float64_against_plain_maths_on_unaligned_views():
    """Tensors starting one element into their storage (the unaligned specialisation), trust
    ratio and momentum written out in fp64 from the formulas."""
    g = torch.Generator().manual_seed(3)
    shapes = [(2100,), (3, 5), (1,)]
    ws = [torch.randn(n + 1, generator=g, dtype=torch.float64)[1:].view(s) for n, s in zip([2100, 15, 1], shapes)]
    gs = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws]
    bs = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws]
    lr, m, wd, eta = 0.3, 0.85, 0.05, 2e-3
    want_w, want_b = [], []
    for w, gr, b in zip(ws, gs, bs):
        u = gr + wd * w
        trust = eta * w.norm() / u.norm()
        nb = m * b + trust * u
        want_b.append(nb), want_w.append(w - lr * nb)
    lars_step_(ws, gs, bs, lr=lr, momentum=m, weight_decay=wd, trust_coefficient=eta, adapt=True, backend="triton")
    for w, b, ww, wb in zip(ws, bs, want_w, want_b):
        torch.testing.assert_close(w, ww, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(b, wb, rtol=1e-13, atol=1e-15)


def test_three_launches_for_weights_one_for_excluded(monkeypatch):
    seen = []
    real = lars_mod.lars_update_launch, lars_mod.lars_norms_launches

    def norms(*a, **k):
        made, sq = real[1](*a, **k)
        seen.extend(x.kernel for x in made)
        return made, sq

    monkeypatch.setattr(lars_mod, "lars_update_launch", lambda *a, **k: seen.append("update") or real[0](*a, **k))
    monkeypatch.setattr(lars_mod, "lars_norms_launches", norms)
    nets, opts = _pair(torch.float32)
    _steps(nets, opts, n=1)
    assert seen == ["lars_norms_kernel", "lars_norms_finish_kernel", "update", "update"]


def test_no_host_sync_once_the_tables_exist():
    nets, opts = _pair(torch.float32)
    _steps(nets, opts, n=1)  # builds the tables
    for p in nets[0].parameters():
        p.grad.normal_()  # same gradient tensors: nothing to rebuild
    with record_host_syncs() as syncs:
        opts[0].step()
    assert [str(s) for s in syncs] == []


def test_what_the_kernels_cannot_take():
    w = [torch.randn(4, 6)]
    g_t = [torch.randn(6, 4).t()]  # a transposed gradient: not the weight's layout
    b = [torch.zeros(4, 6)]
    with pytest.raises(ValueError, match="dense layout"):
        lars_step_(w, g_t, b, **HYPER, adapt=True, backend="triton")
    with pytest.raises(ValueError, match="fp32 and fp64"):
        lars_step_([x.half() for x in w], [x.half() for x in w], [x.half() for x in b], **HYPER, adapt=True,
                   backend="triton")
    with pytest.raises(ValueError, match="2 grads"):
        lars_step_(w, w + w, b, **HYPER, adapt=True)
    # auto: the reference takes what the kernels cannot
    w2, g2, b2 = [w[0].clone()], [g_t[0].clone()], [b[0].clone()]
    lars_step_(w, g_t, b, **HYPER, adapt=True, backend="auto")
    lars_step_reference_(w2, g2, b2, **HYPER, adapt=True)
    torch.testing.assert_close(w[0], w2[0])
