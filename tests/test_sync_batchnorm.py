"""SyncFreeBatchNorm: PyTorch's BatchNorm on one rank; the whole batch's statistics on two."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from fastbyol.sync_batchnorm import SyncFreeBatchNorm, convert_to_sync_free

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_rank_group(tmp_path):
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


@pytest.mark.parametrize("shape,momentum", [((7, 5, 3, 2), 0.1), ((9, 6), None), ((4, 3, 5), 0.3)])
def test_one_rank_equals_batchnorm(one_rank_group, shape, momentum):
    """With a process group of one, the all-reduce path (not the fallback) gives BatchNorm's
    outputs, gradients and running statistics."""
    torch.manual_seed(0)
    c = shape[1]
    ref = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](c, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.normal_(), ref.running_mean.normal_(), ref.running_var.uniform_(0.5, 2)
    bn = convert_to_sync_free(ref.__class__(c, momentum=momentum))
    bn.load_state_dict(ref.state_dict())
    assert isinstance(bn, SyncFreeBatchNorm)
    for _ in range(3):
        x = (torch.randn(shape) * 2 + 5).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn(shape)
        y, y2 = ref(x), bn(x2)
        (y * dy).sum().backward()
        (y2 * dy).sum().backward()
        torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    bn.eval(), ref.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(bn(x), ref(x))


def test_conversion_keeps_names_parameters_and_modes():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    net[1].eval()
    for p in net.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = convert_to_sync_free(net)
    assert isinstance(out[1], SyncFreeBatchNorm) and isinstance(out[4], SyncFreeBatchNorm)
    assert not out[1].training and out[4].training
    assert not any(p.requires_grad for p in out.parameters())
    assert out.state_dict().keys() == before.keys()
    assert all(torch.equal(out.state_dict()[k], v) for k, v in before.items())


def test_two_ranks_equal_batchnorm_on_the_whole_batch():
    """tests/bn_worker.py: 2 gloo ranks vs one process's BatchNorm on the concatenated batch
    (float64 reference; means up to 1e4 standard deviations from 0; a backward without its all-reduce is caught)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "bn_worker.py")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "rank 0: ok" in res.stdout and "rank 1: ok" in res.stdout


def test_variance_survives_a_large_mean(one_rank_group):
    """A mean 1e4 standard deviations from 0: the naive fp32 E[x²] − E[x]² loses the
    variance entirely; the float64 combine keeps it to fp32 precision."""
    x = (torch.randn(64, 4, 5, 5, dtype=torch.float64) * 3 + 3e4).float()
    truth = x.double().var(dim=(0, 2, 3), correction=1)
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2
    assert ((naive.double() * 1600 / 1599 - truth).abs() / truth).max() > 0.01
    bn = SyncFreeBatchNorm(4, momentum=1.0)  # running_var = this batch's unbiased variance
    bn(x)
    torch.testing.assert_close(bn.running_var.double(), truth, rtol=1e-5, atol=0)


def test_eval_without_running_statistics_is_local_and_does_not_all_reduce(one_rank_group, monkeypatch):
    """nn.SyncBatchNorm's rule: only training synchronises. An eval-mode layer without running
    statistics normalises by its own batch; a collective there hangs when ranks differ
    (tests/bn_worker.py runs that on two ranks)."""
    from fastbyol import sync_batchnorm

    def refuse(t):
        raise AssertionError("eval mode all-reduced")

    bn = SyncFreeBatchNorm(3, track_running_stats=False).eval()
    monkeypatch.setattr(sync_batchnorm, "_all_reduce_sum", refuse)
    x = torch.randn(5, 3, 4) * 2 + 1
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, "same"])
def test_low_precision_inputs(one_rank_group, dtype, param_dtype):
    """bf16/fp16 data (autocast: fp32 parameters; or a model cast whole): statistics and
    maths in fp32, output and input gradient in the data's dtype, parameter gradients in the
    parameters' dtype, running statistics as fp32 BatchNorm on the upcast data."""
    torch.manual_seed(1)
    param_dtype = dtype if param_dtype == "same" else param_dtype
    ref = nn.BatchNorm2d(4)
    bn = convert_to_sync_free(nn.BatchNorm2d(4)).to(param_dtype)
    bn.load_state_dict(ref.state_dict())
    x = (torch.randn(6, 4, 3, 3) * 2 + 3).to(dtype)
    dy = torch.randn(6, 4, 3, 3).to(dtype)
    xr, xb = x.float().requires_grad_(), x.clone().requires_grad_()
    y, yb = ref(xr), bn(xb)
    (y * dy.float()).sum().backward()
    (yb * dy).sum().backward()
    assert yb.dtype == xb.grad.dtype == dtype and bn.weight.grad.dtype == param_dtype
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(yb.float(), y, **tol)
    torch.testing.assert_close(xb.grad.float(), xr.grad, **tol)
    torch.testing.assert_close(bn.weight.grad.float(), ref.weight.grad, **tol)
    torch.testing.assert_close(bn.running_var.float(), ref.running_var, **tol)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_and_backward_do_not_sync_the_host(one_rank_group, momentum):
    from fastbyol.host_sync import record_host_syncs

    bn = SyncFreeBatchNorm(3, momentum=momentum)
    x = torch.randn(4, 3, 5, requires_grad=True)
    with record_host_syncs() as syncs:
        bn(x).square().sum().backward()
    assert [str(s) for s in syncs] == []
