"""Test-only: one rank of the synchronised-BatchNorm check, launched 2x by torchrun (gloo).

    torchrun --standalone --nproc_per_node 2 tests/bn_worker.py

Every rank builds the same global batch, takes its shard, runs :class:`SyncFreeBatchNorm`
forward and backward, and compares with ``nn.BatchNorm`` run by this one process on the whole
(concatenated) batch in float64: outputs, input gradients, the all-reduced weight and bias
gradients, running statistics. Then the same check with the backward all-reduce removed must
fail (the test can see a rank that ignores its peers' gradients). Exits non-zero on a mismatch.
"""
import copy
import os
import sys

import torch
import torch.distributed as tdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbyol import sync_batchnorm  # noqa: E402
from fastbyol.sync_batchnorm import SyncFreeBatchNorm  # noqa: E402


def check(shape, offset, momentum, channels_last=False):
    rank, world = tdist.get_rank(), tdist.get_world_size()
    g = torch.Generator().manual_seed(hash((shape, offset)) % 2**31)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset).float().double()  # fp32-exact input
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w, b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5

    ref = torch.nn.BatchNorm2d(c, momentum=momentum) if len(shape) == 4 else torch.nn.BatchNorm1d(c, momentum=momentum)
    ref32 = copy.deepcopy(ref)  # PyTorch's own fp32 BatchNorm: the rounding we are allowed
    ref = ref.double()
    bn = SyncFreeBatchNorm(c, momentum=momentum)
    for m in (ref, ref32, bn):
        with torch.no_grad():
            m.weight.copy_(w), m.bias.copy_(b), m.running_mean.copy_(rm), m.running_var.copy_(rv)
    xr = x.clone().requires_grad_()
    steps = 2  # two forwards: running statistics compound (and momentum=None averages)
    for _ in range(steps):
        yr = ref(xr)
    (yr * dy).sum().backward()
    x32 = x.float().requires_grad_()
    for _ in range(steps):
        y32 = ref32(x32)
    (y32 * dy.float()).sum().backward()

    shard = shape[0] // world
    sl = slice(rank * shard, (rank + 1) * shard)
    xs = x[sl].float()
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    xs.requires_grad_()
    for _ in range(steps):
        y = bn(xs)
    (y * dy[sl].float()).sum().backward()
    gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
    tdist.all_reduce(gw), tdist.all_reduce(gb)  # what the data-parallel engine does to parameter grads

    def err(got, want):
        return ((got.double() - want.detach()).abs() / (want.detach().abs() + 1)).max().item()

    def close(name, got, fp32, want):
        # Within fp32 rounding: at most a few times PyTorch's own fp32 BatchNorm's error (which
        # grows with |mean| / std: the fp32 mean itself is rounded), and never worse than 2e-5.
        e, tol = err(got, want), max(2e-5, 4 * err(fp32, want))
        return e <= tol, f"{name}: max rel err {e:.2e} (tol {tol:.1e}) shape={shape} offset={offset}"

    results = [close("y", y, y32[sl], yr[sl]), close("dx", xs.grad, x32.grad[sl], xr.grad[sl]),
               close("dweight", gw, ref32.weight.grad, ref.weight.grad),
               close("dbias", gb, ref32.bias.grad, ref.bias.grad),
               close("running_mean", bn.running_mean, ref32.running_mean, ref.running_mean),
               close("running_var", bn.running_var, ref32.running_var, ref.running_var)]
    assert int(bn.num_batches_tracked) == steps
    return results


def main():
    tdist.init_process_group("gloo")
    cases = [((8, 5, 3, 4), 0.0, 0.1, False), ((8, 5, 3, 4), 0.0, 0.1, True), ((6, 7), 0.0, None, False),
             ((8, 5, 3, 4), 1000.0, 0.1, False), ((10, 3, 5, 5), -3e4, 0.1, False)]
    failed = []
    for args in cases:
        failed += [msg for ok, msg in check(*args) if not ok]
    if failed:
        raise SystemExit("rank %d: SyncFreeBatchNorm differs from BatchNorm on the whole batch:\n%s"
                         % (tdist.get_rank(), "\n".join(failed)))
    # An empty shard on rank 0 (rank 1 holds the whole batch): rank 1 gets plain BatchNorm,
    # rank 0 an empty output, both the same running statistics.
    x = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(7)) * 2 + 5
    ref = torch.nn.BatchNorm1d(3)
    bn = SyncFreeBatchNorm(3)
    mine = (x[:0] if tdist.get_rank() == 0 else x).clone().requires_grad_()
    y = bn(mine)
    y.square().sum().backward()
    want = ref(x)
    if tdist.get_rank() == 1 and not torch.allclose(y, want, atol=1e-5):
        failed.append("empty shard on rank 0: rank 1's output differs from BatchNorm")
    if not (torch.allclose(bn.running_mean, ref.running_mean, atol=1e-5)
            and torch.allclose(bn.running_var, ref.running_var, atol=1e-5) and torch.isfinite(mine.grad).all()):
        failed.append("empty shard on rank 0: running statistics or gradients differ")
    if failed:
        raise SystemExit("\n".join(failed))
    # A broken variant: the backward without its all-reduce must be caught.
    inner = sync_batchnorm._all_reduce_sum
    calls = {"n": 0}

    def forward_only(t):
        calls["n"] += 1
        return inner(t) if calls["n"] <= 2 else t  # calls 1-2: the two forwards; then the backward's

    sync_batchnorm._all_reduce_sum = forward_only
    calls["n"] = 0
    results = {name.split(":")[0]: ok for ok, name in check((8, 5, 3, 4), 0.0, 0.1)}
    sync_batchnorm._all_reduce_sum = inner
    if results["dx"] or not results["y"]:
        raise SystemExit("the check did not catch a backward without its all-reduce")
    rank = tdist.get_rank()
    # Eval without running statistics is local: rank 0 alone evaluates, on a batch of its own
    # size; a collective there would leave it waiting for rank 1 (the test's timeout).
    bn = SyncFreeBatchNorm(3, track_running_stats=False).eval()
    if rank == 0:
        x = torch.randn(5, 3, 2) * 2 + 1
        want = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        if not torch.allclose(bn(x), want, atol=1e-6):
            raise SystemExit("eval without running statistics is not a local BatchNorm")
    tdist.barrier()
    tdist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main()
