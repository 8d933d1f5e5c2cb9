"""LocalEngine: accumulation boundaries and fp16 overflow skips (which must not move the target)."""
import torch

from fastbyol.engines import LocalEngine
from fastbyol.model import BYOL
from fastbyol.optim import LARS, param_groups

CPU = torch.device("cpu")


def _setup(precision="fp32", accum=1):
    torch.manual_seed(0)
    model = BYOL("convnet4", projector_hidden=16, predictor_hidden=16, projection_dim=8)
    opt = LARS(param_groups(model.online, 0.0), lr=0.5)
    return model, LocalEngine(model.online, opt, CPU, precision, accum)


def _batch(n=4):
    return torch.randn(n, 3, 16, 16), torch.randn(n, 3, 16, 16)


def test_step_true_only_at_accumulation_boundaries():
    model, eng = _setup(accum=3)
    results = []
    for _ in range(6):
        with eng.autocast():
            eng.backward(model(*_batch(), online=eng.module).loss)
        results.append(eng.step())
    assert results == [False, False, True, False, False, True]


def test_accumulating_two_half_batches_equals_the_mean_gradient():
    model, eng = _setup(accum=2)
    b1, b2 = _batch(), _batch()
    for b in (b1, b2):
        eng.backward(model(*b, online=eng.module).loss)
    acc = [p.grad.clone() for p in model.online.parameters()]
    model.zero_grad()
    l1 = model(*b1).loss
    l2 = model(*b2).loss
    ((l1 + l2) / 2).backward()
    for a, p in zip(acc, model.online.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_fp16_overflow_step_is_skipped_and_leaves_weights_and_target():
    model, eng = _setup("fp16")
    online_before = [p.detach().clone() for p in model.online.parameters()]
    target_before = [p.detach().clone() for p in model.target.parameters()]
    with eng.autocast():
        out = model(*_batch(), online=eng.module)
    eng.backward(out.loss * float("inf"))  # every gradient overflows
    applied = eng.step()
    assert applied is False
    if applied:  # the trainer's rule: the target moves only on applied steps
        model.update_target(0.5)
    for p, b in zip(model.online.parameters(), online_before):
        assert torch.equal(p, b)
    for p, b in zip(model.target.parameters(), target_before):
        assert torch.equal(p, b)
    # Finite steps are applied once the scale has come down far enough.
    for _ in range(20):
        with eng.autocast():
            eng.backward(model(*_batch(), online=eng.module).loss)
        if eng.step():
            break
    else:
        raise AssertionError("no fp16 step was ever applied")
    assert any(not torch.equal(p, b) for p, b in zip(model.online.parameters(), online_before))
