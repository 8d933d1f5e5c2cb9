"""The drop-ins' own contracts beyond the recipes: argument checks, wrapped models, bf16
stochastic rounding against timm's, and the trainer's τ near 1."""
import copy

import pytest
import torch
from torch import nn

import fastbyol_kernels as fk


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 300), nn.BatchNorm1d(300), nn.Linear(300, 4)).to(dtype)


def test_get_ema_multi_avg_fn_checks_decay():
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
            fk.get_ema_multi_avg_fn(bad)


def test_update_momentum_refuses_mismatched_models():
    with pytest.raises(ValueError, match="targets but"):
        fk.update_momentum(nn.Linear(3, 3), nn.Linear(3, 3, bias=False), 0.9)
    with pytest.raises(ValueError, match="shape"):
        fk.update_momentum(nn.Linear(3, 3), nn.Linear(3, 4), 0.9)


def test_model_ema_v3_takes_a_wrapped_model():
    model = _net()
    ema = fk.ModelEmaV3(nn.DataParallel(model), decay=0.5, backend="triton")  # (compile, DDP: test_kernels_ema)
    assert all(k.startswith("module.") and not k.startswith("module.module.") for k in ema.state_dict())
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(nn.DataParallel(model))
    for k, v in ema.module.state_dict().items():
        o = model.state_dict()[k]
        want = 0.5 * before[k] + 0.5 * o if v.is_floating_point() else o
        torch.testing.assert_close(v, want)


def test_model_ema_v3_stochastic_rounding_tracks_timm():
    # bf16 average, timm's default stochastic rounding on both: other random bits, the same
    # expectation. Nearest rounding would leave these small steps at 0.
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    model = _net(torch.bfloat16)
    peer, fused = timm_ema.ModelEmaV3(model, decay=0.999), fk.ModelEmaV3(model, decay=0.999, backend="triton")
    start = [p.detach().double().clone() for p in fused.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    for step in range(8):
        peer.update(model)
        fused.update(model)
    for s, a, b in zip(start, fused.module.parameters(), peer.module.parameters()):
        moved_fused, moved_peer = (a.double() - s).mean().item(), (b.double() - s).mean().item()
        exact = 0.05 * (1 - 0.999 ** 8)  # 4.0e-4
        assert abs(moved_fused - exact) < 0.5 * exact and abs(moved_peer - exact) < 0.5 * exact


def test_trainer_tau_near_one_is_exact():
    # The trainer passes tau_at's double τ; at the end of the cosine schedule 1 − τ is ~1e-8,
    # where an fp32 τ would be 1 (no update) or 1 − 6e-8.
    from fastbyol.model import BYOL
    from fastbyol.schedules import tau_at

    model = BYOL(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), image_size=2, projector_hidden=8,
                 predictor_hidden=8, projection_dim=4)
    for p in model.target.parameters():
        p.data.zero_()
    for p in model.online.parameters():
        p.data.fill_(1.0)
    tau = tau_at(9999, 10000, 0.996)
    model.update_target(tau, backend="triton")
    want = torch.tensor(1 - tau, dtype=torch.float64).float().item()
    assert all(torch.all(p == want) for p in model.target.parameters())
    assert want != torch.tensor(1 - torch.tensor(tau).item()).float().item()  # what fp32 τ would give
