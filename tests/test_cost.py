"""fastbyol cost: the counter against hand counts, a wasteful stage caught, the CLI, and the
committed ResNet-50 figures as a regression guard."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastbyol.cli import main
from fastbyol.config import preset
from fastbyol.cost import modelled_stage_ms, step_cost, summarize
from fastbyol.cost import step as cost_step
from fastbyol.cost.counter import CostCounter
from fastbyol.cost.report import regressions

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
COMMITTED = os.path.join(RESULTS, "cost_imagenet-resnet50_b256_bf16.json")


def counted(fn):
    counter = CostCounter()
    with counter:
        out = fn()
    return [r.cost for r in counter.records], out


def meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


@pytest.mark.parametrize("rows,cols", [(7, 13), (64, 3)])
def test_elementwise_broadcast_reads_the_small_operand_once(rows, cols):
    a, b = meta(rows, cols), meta(cols)
    costs, _ = counted(lambda: a + b)
    (c,) = costs
    assert (c.launches, c.bytes_read, c.bytes_written, c.flops) == (1, 4 * (rows * cols + cols), 4 * rows * cols,
                                                                     rows * cols)


def test_views_and_allocations_are_free():
    x = meta(6, 10)
    costs, _ = counted(lambda: (x.view(10, 6).t().unsqueeze(0).expand(3, 6, 10), torch.empty(5, device="meta")))
    assert costs == []


@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (33, 64, 17)])
def test_matmul_hand_count(m, k, n):
    a, b = meta(m, k, dtype=torch.bfloat16), meta(k, n, dtype=torch.bfloat16)
    (c,), _ = counted(lambda: a @ b)
    assert c.kind == "matmul" and c.flops == 2 * m * k * n
    assert (c.bytes_read, c.bytes_written) == (2 * (m * k + k * n), 2 * m * n)


def test_conv_forward_and_backward_hand_count():
    n, cin, cout, h, w, groups = 3, 4, 6, 9, 7, 2
    x, wt = meta(n, cin, h, w, grad=True), meta(cout, cin // groups, 3, 3, grad=True)
    costs, y = counted(lambda: F.conv2d(x, wt, padding=1, groups=groups))
    (fwd,) = costs
    macs = n * cout * h * w * (cin // groups) * 9
    assert fwd.kind == "conv" and fwd.flops == 2 * macs
    assert (fwd.bytes_read, fwd.bytes_written) == (4 * (x.numel() + wt.numel()), 4 * y.numel())
    dy = meta(*y.shape)
    costs, _ = counted(lambda: y.backward(dy))
    (bwd,) = [c for c in costs if c.op == "convolution_backward"]
    assert bwd.flops == 2 * 2 * macs and bwd.launches == 2  # grad input and grad weight
    assert bwd.bytes_written == 4 * (x.numel() + wt.numel())


def test_batchnorm_forward_and_backward_hand_count():
    x = meta(4, 8, 5, 3, dtype=torch.bfloat16, grad=True)
    weight, bias = meta(8, grad=True), meta(8, grad=True)
    rm, rv = meta(8), meta(8)
    costs, y = counted(lambda: F.batch_norm(x, rm, rv, weight, bias, training=True))
    (fwd,) = [c for c in costs if "batch_norm" in c.op]
    xb = 2 * x.numel()
    assert fwd.bytes_read == 2 * xb and fwd.bytes_written == xb  # 6 B/element in bf16
    costs, _ = counted(lambda: y.backward(meta(*y.shape, dtype=torch.bfloat16)))
    (bwd,) = [c for c in costs if "batch_norm" in c.op]
    assert bwd.bytes_read == 4 * xb and bwd.bytes_written == xb  # 10 B/element in bf16


def test_foreach_fast_path_and_per_tensor_slow_path():
    ts = [meta(3, 5), meta(3, 5), meta(3, 5)]
    (fast,), _ = counted(lambda: torch._foreach_mul_(ts, 0.5))
    assert fast.launches == 1 and fast.bytes_read == fast.bytes_written == 3 * 60
    shapes = [meta(3, 5), meta(7), meta(2, 2, 2)]
    scalars = [meta(()) for _ in shapes]
    (slow,), _ = counted(lambda: torch._foreach_addcmul_(shapes, shapes, scalars))
    assert slow.launches == 3  # a list of 0-d tensors: one launch per tensor on CUDA


def test_autocast_emulation_casts_a_parameter_once_per_region():
    w = torch.nn.Parameter(meta(4, 6))
    x = meta(2, 6)
    counter = CostCounter()
    with counter, cost_step.CudaAutocast(torch.bfloat16):
        y1, y2 = F.linear(x, w), F.linear(x, w)
    assert y1.dtype == y2.dtype == torch.bfloat16
    casts = [r.cost for r in counter.records if r.cost.op == "_to_copy" and r.cost.bytes_read == 4 * w.numel()]
    assert len(casts) == 1


@pytest.fixture(scope="module")
def smoke_summary():
    cfg = preset("smoke")
    return summarize(step_cost(cfg)), cfg


def test_smoke_step_counts_triton_launches_from_their_descriptions(smoke_summary):
    summary, cfg = smoke_summary
    ops = {(r["stage"], r["op"]): r for r in summary["ops"]}
    assert ops[("loss", "triton:loss_fwd")]["launches"] == 1 and ops[("loss", "triton:loss_bwd")]["launches"] == 1
    ema = ops[("ema", "triton:ema_kernel")]
    from fastbyol.parts import build_model

    model = build_model(preset("smoke"), torch.device("cpu"))
    n = sum(p.numel() for m in (model.online.encoder, model.online.projector) for p in m.parameters())
    assert ema["bytes_written"] == 4 * n  # the target, once, fp32
    assert ema["bytes_read"] >= 8 * n and ema["bytes_read"] - 8 * n < 0.01 * n  # + the block table
    for stage in ("augmentation", "forward", "backward", "batchnorm", "optimizer"):
        assert summary["stages"][stage]["launches"] > 0, stage


def test_a_wasteful_stage_is_caught(smoke_summary, monkeypatch):
    summary, cfg = smoke_summary
    real = cost_step.augment_pair

    def wasteful(*args, **kwargs):  # one extra copy of each view
        return tuple(v.clone() for v in real(*args, **kwargs))

    monkeypatch.setattr(cost_step, "augment_pair", wasteful)
    worse = summarize(step_cost(cfg))
    b, s = cfg.train.batch_size, cfg.augment.image_size
    extra = 2 * (2 * b * 3 * s * s * 4)  # read + write, both views, fp32 views on this preset
    assert worse["stages"]["augmentation"]["bytes"] - summary["stages"]["augmentation"]["bytes"] == extra
    assert worse["stages"]["augmentation"]["launches"] == summary["stages"]["augmentation"]["launches"] + 2
    assert regressions(summary, summary, 0.0) == []


def test_the_regression_guard_catches_an_extra_copy(smoke_summary, monkeypatch):
    """A copy of the predictions before the fused loss: the loss stage grows past 10%."""
    summary, cfg = smoke_summary
    real = cost_step.build_model

    def wasteful_model(cfg_, device):
        model = real(cfg_, device)
        loss_fn = model.loss_fn
        model.loss_fn = lambda p1, p2, z1, z2: loss_fn(p1.clone(), p2.clone(), z1, z2)
        return model

    monkeypatch.setattr(cost_step, "build_model", wasteful_model)
    worse = summarize(step_cost(cfg))
    assert [r[0] for r in regressions(summary, worse, 0.10)] == ["loss"]
    assert worse["stages"]["loss"]["x_floor"] > summary["stages"]["loss"]["x_floor"]


def test_world_size_counts_collectives(smoke_summary):
    cfg = preset("smoke")
    two = summarize(step_cost(cfg, world_size=2))
    assert two["stages"]["collectives"]["launches"] > 0
    assert two["stages"]["batchnorm"]["launches"] > smoke_summary[0]["stages"]["batchnorm"]["launches"]


def test_cli_prints_the_table_and_saves(tmp_path, capsys):
    assert main(["cost", "--preset", "smoke", "--batch-size", "8", "--save", str(tmp_path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "| augmentation |" in out and "H200 ms" in out
    saved = json.loads((tmp_path / "cost_smoke_b8_fp32.json").read_text())
    assert saved["micro_batch"] == 8 and saved["total"]["ms_H200"] > 0
    assert main(["cost", "--preset", "smoke", "--precision", "fp16"]) == 2  # one-line error


def test_modelled_stage_ms_for_gpu_check():
    ms = modelled_stage_ms(preset("smoke"), "H100")
    assert ms["step"] == pytest.approx(sum(v for k, v in ms.items() if k != "step"))


def test_committed_resnet50_figures_have_not_grown():
    """The regression guard: every stage's modelled traffic within 10% of the committed figures
    (benchmarks/results/cost_imagenet-resnet50_b256_bf16.json; rerun `fastbyol cost --preset
    imagenet-resnet50 --batch-size 256 --precision bf16 --save benchmarks/results` after a
    deliberate change)."""
    with open(COMMITTED) as fh:
        committed = json.load(fh)
    cfg = preset("imagenet-resnet50")
    cfg.train.batch_size, cfg.train.precision = committed["global_batch"], committed["precision"]
    now = summarize(step_cost(cfg, committed["world_size"]))
    assert regressions(committed, now, 0.10) == []
