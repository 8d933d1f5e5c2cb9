"""The fused EMA as a drop-in, in the recipes people run: MoCo key encoder, DINO teacher, mean
teacher, timm model EMA. A small ResNet-shaped network with BatchNorm trains with real SGD
steps; after every step the fused average must equal the peer's (lightly's
update_momentum, DINO's loop, AveragedModel, timm's ModelEmaV3), parameters and buffers, to
fp32 rounding (bf16: to one bf16 rounding), in fp32, bf16 and mixed (bf16 model, fp32 average).
The kernel runs under the interpreter (``backend="triton"``)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbyol_kernels as fk
from fastbyol.schedules import tau_at

STEPS = 4
# (model dtype, average dtype)
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "mixed": (torch.bfloat16, torch.float32)}


class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU, one residual basic block, pooled linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


def _trainer(dtype, seed=0):
    """A model and a step function: one SGD step on a fresh random batch (BN statistics move)."""
    torch.manual_seed(seed)
    model = TinyResNet().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1)

    def step():
        x = torch.randn(6, 3, 6, 6, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        loss = F.cross_entropy(model(x.to(dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return x

    return model, step


def _assert_same(fused: nn.Module, peer: nn.Module, avg_dtype, where="", exact=False):
    """Every parameter and buffer: fp32 to a few ulp (the peers' own CPU kernels use FMA,
    the interpreter does not). bf16: one update differs by at most two bf16 roundings (the
    tie-breaking of the final rounding; lightly's mul-then-add rounds twice), and then the
    two averages are set equal again, so each step is compared on its own."""
    tol = dict(rtol=1e-6, atol=1e-9) if avg_dtype == torch.float32 else dict(rtol=2 ** -6, atol=1e-6)
    f, p = fused.state_dict(), peer.state_dict()
    assert list(f) == list(p)
    for k in f:
        assert f[k].dtype == p[k].dtype, k
        if f[k].is_floating_point() and exact:
            assert torch.equal(f[k], p[k]), f"{where} {k}: {(f[k] != p[k]).sum().item()} of {f[k].numel()} differ"
        elif f[k].is_floating_point():
            torch.testing.assert_close(f[k], p[k], **tol, msg=lambda m: f"{where} {k}: {m}")
        else:
            assert torch.equal(f[k], p[k]), f"{where} {k}: {f[k]} != {p[k]}"
    if avg_dtype == torch.bfloat16:
        for k in f:
            f[k].copy_(p[k])


def _teacher_forward(*teachers):
    """A teacher's own forward in train mode moves its BN statistics (MoCo, DINO, BYOL)."""
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(len(teachers)))
    with torch.no_grad():
        for t in teachers:
            t(x.to(next(t.parameters()).dtype))


@pytest.mark.parametrize("dtypes", DTYPES)
def test_moco_key_encoder_matches_lightly(dtypes):
    lightly_utils = pytest.importorskip("lightly.models.utils")
    from lightly.utils.scheduler import cosine_schedule
    model_dtype, avg_dtype = DTYPES[dtypes]
    query, step = _trainer(model_dtype)
    key_peer = copy.deepcopy(query).to(avg_dtype).requires_grad_(False)
    key_fused = copy.deepcopy(key_peer)
    for k in range(STEPS):
        step()
        m = cosine_schedule(k, STEPS, 0.99, 1.0)  # MoCo v3's momentum schedule
        lightly_utils.update_momentum(query, key_peer, m)
        fk.update_momentum(query, key_fused, m, backend="triton")
        _assert_same(key_fused, key_peer, avg_dtype, f"step {k}")
        _teacher_forward(key_peer, key_fused)  # its BN statistics: compared after the next update


@pytest.mark.parametrize("dtypes", DTYPES)
def test_dino_teacher_matches_its_loop(dtypes):
    model_dtype, avg_dtype = DTYPES[dtypes]
    student, step = _trainer(model_dtype)
    teacher_peer = copy.deepcopy(student).to(avg_dtype).requires_grad_(False)
    teacher_fused = copy.deepcopy(teacher_peer)
    ema = fk.ModuleEMA(student, teacher_fused, buffers="none", backend="triton")
    for k in range(STEPS + 1):
        step()
        # DINO's cosine_scheduler(0.996, 1, ...) and fastbyol's tau_at: one schedule, 0.996 → 1.
        m = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * k / STEPS))
        before = copy.deepcopy(teacher_fused.state_dict())
        with torch.no_grad():  # DINO's update, add_ promoting a bf16 student in-kernel
            for p_t, p_s in zip(teacher_peer.parameters(), student.parameters()):
                p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)
        ema.update(tau_at(k, STEPS, 0.996))
        if k == STEPS:  # m = 1: the teacher is bit-identical
            assert all(torch.equal(v, teacher_fused.state_dict()[n]) for n, v in before.items())
        _assert_same(teacher_fused, teacher_peer, avg_dtype, f"step {k}")
        _teacher_forward(teacher_peer, teacher_fused)


def _mean_teacher_peer(student, avg_dtype, decay):
    """AveragedModel where it runs (it refuses mixed dtypes); the plain loop for mixed."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if avg_dtype == next(student.parameters()).dtype:
        peer = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        return peer, peer.update_parameters

    peer = copy.deepcopy(student).to(avg_dtype)

    @torch.no_grad()
    def update(model):
        for t, o in zip([*peer.parameters(), *peer.buffers()], [*model.parameters(), *model.buffers()]):
            if t.is_floating_point():
                t.mul_(decay).add_(o, alpha=1 - decay)
            else:  # AveragedModel's integer rule
                t.copy_(t * decay + o * (1 - decay))
    return _Holder(peer), update


class _Holder(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("dtypes", DTYPES)
def test_mean_teacher_matches_averaged_model(dtypes):
    from torch.optim.swa_utils import AveragedModel

    model_dtype, avg_dtype = DTYPES[dtypes]
    student, step = _trainer(model_dtype)
    peer, peer_update = _mean_teacher_peer(student, avg_dtype, 0.9)
    fused = AveragedModel(student, multi_avg_fn=fk.get_ema_multi_avg_fn(0.9, backend="triton"), use_buffers=True)
    fused.module.to(avg_dtype)
    if isinstance(peer, AveragedModel):  # the first update copies; ours too
        peer.update_parameters(student)
        fused.update_parameters(student)
    else:
        fused.update_parameters(student)  # the copy
    for k in range(STEPS):
        step()
        peer_update(student)
        fused.update_parameters(student)
        _assert_same(fused.module, peer.module, avg_dtype, f"step {k}")
    # num_batches_tracked went through AveragedModel's integer rule (truncated float average)
    assert fused.module.stem[1].num_batches_tracked.item() < student.stem[1].num_batches_tracked.item()


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_timm_model_ema_matches_model_ema_v3(dtypes, exclude_buffers):
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    model_dtype, avg_dtype = DTYPES[dtypes]
    model, step = _trainer(model_dtype)
    kw = dict(decay=0.95, use_warmup=True, warmup_power=3 / 4, update_after_step=1, exclude_buffers=exclude_buffers,
              dtype=avg_dtype, stochastic_rounding=False)  # stochastic: tests/test_kernels_ema.py
    peer = timm_ema.ModelEmaV3(model, **kw)
    fused = fk.ModelEmaV3(model, **kw, backend="triton")
    for k in range(STEPS + 2):
        step()
        peer.update(model, step=k)
        fused.update(model, step=k)
        assert fused.get_decay(k) == peer.get_decay(k)
        # One dtype: timm runs torch.lerp, which the kernel equals bit for bit (its fma, one
        # rounding to nearest even; conftest gives the interpreter the compiled rounding, its own
        # truncation failed this in bf16). Mixed dtypes: timm multiplies then adds (two roundings).
        _assert_same(fused.module, peer.module, avg_dtype, f"step {k}", exact=model_dtype == avg_dtype)
