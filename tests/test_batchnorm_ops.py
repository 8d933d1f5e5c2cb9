"""fastbyol.batchnorm_ops: each reference primitive against fp64 maths on the whole batch
(and against PyTorch's fused CUDA kernel where there is a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from fastbyol.batchnorm_ops import NATIVE, REFERENCE

EPS = 1e-5


def _shards(shape, sizes, offset, seed, layout=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset).float()
    dy = torch.randn(shape, generator=g).float()
    xs = [s.contiguous(memory_format=layout) for s in x.split(sizes)]
    dys = [s.contiguous(memory_format=layout) for s in dy.split(sizes)]
    return x, dy, xs, dys


def _whole_batch_fp64(x, dy, w, b):
    """Output, gradients, mean and biased variance of BatchNorm on the whole batch, in fp64."""
    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    y = F.batch_norm(xd, None, None, wd, bd, training=True, eps=EPS)
    (y * dy.double()).sum().backward()
    var, mean = torch.var_mean(x.double(), dim=[0, *range(2, x.dim())], correction=0)
    return y.detach(), xd.grad, wd.grad, bd.grad, mean, var


def _run(ops, xs, dys, w, b, rm, rv, momentum):
    """The synchronised algorithm on shards in one process (the sums stand in for the all-reduces)."""
    c = xs[0].shape[1]
    stats = [ops.stats(x, EPS) for x in xs]
    mean_all = torch.stack([m for m, _ in stats])
    invstd_all = torch.stack([i for _, i in stats])
    counts = torch.tensor([x.numel() // c for x in xs], dtype=mean_all.dtype, device=mean_all.device)
    mean, invstd = ops.gather_stats_with_counts(xs[0], mean_all, invstd_all, rm, rv, momentum, EPS, counts)
    ys = [ops.elemt(x, w, b, mean, invstd, EPS) for x in xs]
    red = [ops.backward_reduce(dy, x, mean, invstd, w, True, True, True) for dy, x in zip(dys, xs)]
    sum_dy, sum_dy_xmu = sum(r[0] for r in red), sum(r[1] for r in red)
    dxs = [ops.backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, counts.to(torch.int32))
           for dy, x in zip(dys, xs)]
    return ys, dxs, sum(r[2] for r in red), sum(r[3] for r in red), mean, invstd


@pytest.mark.parametrize("shape,sizes,offset,layout", [
    ((11, 5, 3, 2), [4, 7], 0.0, torch.contiguous_format),
    ((10, 3, 3, 3), [1, 6, 3], 1000.0, torch.channels_last),
    ((9, 7), [5, 4], -3e4, torch.contiguous_format),
    ((6, 4, 5), [3, 3], 2.0, torch.contiguous_format),
])
def test_reference_primitives_equal_fp64_batchnorm_on_the_whole_batch(shape, sizes, offset, layout):
    x, dy, xs, dys = _shards(shape, sizes, offset, seed=len(sizes) + shape[0])
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    ys, dxs, gw, gb, mean, invstd = _run(REFERENCE, xs, dys, w, b, rm, rv, 0.3)
    y64, dx64, gw64, gb64, mean64, var64 = _whole_batch_fp64(x, dy, w, b)

    def close(got, want, tol):
        scale = want.abs().max().clamp_min(1)
        assert ((got.double() - want).abs().max() / scale).item() < tol

    # fp32 maths: the mean's rounding (6e-8·|mean|) shows in x − mean, relative to std = 3.
    tol = 2e-6 + 4 * 6e-8 * abs(offset) / 3
    close(mean, mean64, 1e-6)
    close(1 / invstd.double() ** 2 - EPS, var64, tol)
    close(torch.cat(ys), y64, tol)
    close(torch.cat(dxs), dx64, tol)
    close(gw, gw64, tol), close(gb, gb64, 1e-6)
    n = x.numel() // c
    close(rm, 0.7 * rm0.double() + 0.3 * mean64, 1e-6)
    close(rv, 0.7 * rv0.double() + 0.3 * var64 * n / (n - 1), tol)
    assert all(y.dtype == torch.float32 for y in ys + dxs)


def test_reference_stats_of_a_constant_channel_without_eps_is_zero_not_inf():
    x = torch.ones(4, 2, 3)
    mean, invstd = REFERENCE.stats(x, 0.0)
    assert torch.equal(mean, torch.ones(2)) and torch.equal(invstd, torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_primitives_take_low_precision_data_with_fp32_parameters(dtype):
    x = torch.randn(6, 3, 4).to(dtype)
    mean, invstd = REFERENCE.stats(x, EPS)
    assert mean.dtype == invstd.dtype == torch.float32
    y = REFERENCE.elemt(x, torch.ones(3), torch.zeros(3), mean, invstd, EPS)
    assert y.dtype == dtype
    ref = F.batch_norm(x.float(), None, None, training=True, eps=EPS)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels are CUDA-only")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_native_kernels_equal_the_references(layout):
    _, _, xs, dys = _shards((12, 6, 5, 3), [5, 7], 10.0, seed=3, layout=layout)
    c = 6
    w, b, rm, rv = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c), torch.rand(c) + 0.5
    cpu = _run(REFERENCE, xs, dys, w, b, rm.clone(), rv.clone(), 0.1)
    gpu = _run(NATIVE, [t.cuda() for t in xs], [t.cuda() for t in dys], w.cuda(), b.cuda(), rm.cuda(), rv.cuda(), 0.1)
    for a, g in zip(cpu, gpu):
        for u, v in zip(a if isinstance(a, list) else [a], g if isinstance(g, list) else [g]):
            torch.testing.assert_close(v.cpu(), u, rtol=1e-5, atol=1e-5)


def test_an_empty_rank_anywhere_is_ignored_without_a_mask():
    """The synchronised forward's own row building and ordering (fastbyol.sync_batchnorm) on
    three simulated ranks, the first one empty: the fused merge divides by the count so far,
    so unordered rows give NaN; ordered by count they give the whole batch's statistics."""
    from fastbyol.sync_batchnorm import _gathered, _own_row

    x, _, xs, _ = _shards((11, 4, 3), [0, 5, 6], 7.0, seed=5)
    rows = sum(_own_row(REFERENCE, s, EPS, 3, r) for r, s in enumerate(xs))  # the all-reduce
    c = 4
    unordered = REFERENCE.gather_stats_with_counts(x, rows[:, :c], rows[:, c:2 * c], None, None, 0.1, EPS,
                                                   rows[:, 2 * c])
    assert torch.isnan(unordered[0]).all()
    mean, invstd = REFERENCE.gather_stats_with_counts(x, *_gathered(rows)[:2], None, None, 0.1, EPS, _gathered(rows)[2])
    var, want = torch.var_mean(x.double(), dim=[0, 2], correction=0)
    torch.testing.assert_close(mean.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(var + EPS), rtol=1e-5, atol=0)
