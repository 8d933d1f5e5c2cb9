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
