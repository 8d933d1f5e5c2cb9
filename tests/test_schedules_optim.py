"""Schedules at known steps; one LARS step against a float64 reference."""
import math

import pytest
import torch
from torch import nn

from fastbyol.config import OptimConfig
from fastbyol.optim import LARS, build_optimizer, param_groups
from fastbyol.schedules import lr_at, scaled_lr, tau_at


def test_scaled_lr_is_linear_in_batch():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(1.0, 256) == 1.0


@pytest.mark.parametrize("step,expected", [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0), (120, 0.0)])
def test_lr_warmup_then_cosine(step, expected):
    assert lr_at(step, total_steps=100, peak_lr=1.0, warmup_steps=10) == pytest.approx(expected, abs=1e-12)


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 100, 2.0, 0) == pytest.approx(2.0)


@pytest.mark.parametrize("step", [0, 1, 37, 50, 99, 100])
def test_tau_cosine_formula(step):
    k, tau_base = 100, 0.996
    expected = 1 - (1 - tau_base) * (math.cos(math.pi * step / k) + 1) / 2
    assert tau_at(step, k, tau_base) == pytest.approx(expected, abs=1e-15)
    assert tau_at(0, k, tau_base) == pytest.approx(tau_base)
    assert tau_at(k, k, tau_base) == 1.0
    assert tau_at(50, k, 0.99) == pytest.approx(0.995)


def _net():
    return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _lars_reference(params64, grads64, bufs64, excluded, lr, momentum, wd, eta):
    out_p, out_b = [], []
    for p, g, b, ex in zip(params64, grads64, bufs64, excluded):
        u = g if ex else g + wd * p
        if not ex:
            pn, un = p.norm(), u.norm()
            trust = eta * pn / un if pn > 0 and un > 0 else torch.tensor(1.0, dtype=torch.float64)
            u = trust * u
        b = momentum * b + u
        out_b.append(b)
        out_p.append(p - lr * b)
    return out_p, out_b


def test_param_groups_exclude_bias_and_norm():
    net = _net()
    decay, excluded = param_groups(net, 1e-6)
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in excluded["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]


def test_lars_two_steps_match_float64_reference():
    torch.manual_seed(1)
    net = _net()
    with torch.no_grad():  # a zero weight matrix: trust ratio falls back to 1
        net[3].weight.zero_()
    lr, momentum, wd, eta = 0.7, 0.9, 1e-2, 1e-3
    opt = LARS(param_groups(net, wd), lr=lr, momentum=momentum, trust_coefficient=eta)
    params = [p for g in opt.param_groups for p in g["params"]]
    excluded = [g["lars_exclude"] for g in opt.param_groups for _ in g["params"]]
    p64 = [p.detach().double().clone() for p in params]
    b64 = [torch.zeros_like(p) for p in p64]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        p64, b64 = _lars_reference(p64, [g.double() for g in grads], b64, excluded, lr, momentum, wd, eta)
    for p, r in zip(params, p64):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-7)


def test_lars_step_does_not_sync(monkeypatch):
    net = _net()
    opt = LARS(param_groups(net, 1e-6), lr=0.1)
    for p in net.parameters():
        p.grad = torch.randn_like(p)

    def boom(*a, **k):
        raise AssertionError("host sync in the LARS step")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    opt.step()


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_registry(name, cls):
    opt = build_optimizer(_net(), OptimConfig(optimizer=name, weight_decay=1e-4), lr=0.1)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
