"""The five BatchNorm primitives synchronised BatchNorm is built from: PyTorch's fused CUDA
kernels on a GPU, a plain PyTorch reference of each elsewhere (they have no CPU kernels).

The primitives, as ``nn.SyncBatchNorm`` uses them (per channel c; ``n_r`` rank r's count):

* ``stats(x, eps) -> (mean, invstd)``: this rank's mean and ``1/sqrt(var + eps)`` (biased var);
* ``gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum, eps,
  counts) -> (mean, invstd)``: every rank's ``[W, C]`` statistics merged rank by rank (Chan's
  parallel variance: no cancellation whatever the mean; a leading rank of count 0 gives 0/0,
  so callers put empty ranks last), running statistics lerped towards the global
  mean and the unbiased global variance;
* ``elemt(x, weight, bias, mean, invstd, eps) -> y = (x − mean)·invstd·weight + bias``;
* ``backward_reduce(dy, x, mean, invstd, weight, need_input, need_weight, need_bias)
  -> (Σdy, Σdy·(x − mean), grad_weight, grad_bias)`` over this rank's batch;
* ``backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
  -> dx = (dy − Σdy/N − (x − mean)·invstd²·Σdy·(x − mean)/N)·invstd·weight`` with the sums
  all-reduced and ``N = Σ counts``.

Each CUDA kernel reads its inputs once: a training BatchNorm reads x twice and writes y once
forward, reads (dy, x) twice and writes dx once backward, the same traffic as a local
(cuDNN) BatchNorm. The references compute in fp32 (fp64 for fp64 inputs) like the kernels,
so the CPU tests run the algorithm the GPU runs; they are tested against fp64 maths.

Examples:
    >>> x = torch.randn(8, 3, 4)
    >>> mean, invstd = ops_for(x).stats(x, 1e-5)
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x: Tensor):
    return [0, *range(2, x.dim())]


def _c(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector broadcast against ``[N, C, *]``."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def stats_reference(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x.to(_acc(x)), dim=_dims(x), correction=0)
    # The kernel's convention: invstd 0 for a constant channel without eps (not inf).
    invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), torch.rsqrt(var + eps))
    return mean, invstd


def gather_stats_with_counts_reference(x: Tensor, mean_all: Tensor, invstd_all: Tensor,
                                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                                       momentum: float, eps: float, counts: Tensor) -> Tuple[Tensor, Tensor]:
    # The CUDA kernel's merge, rank by rank (Chan et al.: the centred M2 of each rank plus the
    # spread of the means, nothing cancels), in fp64 here (the kernel: fp32). Like the kernel,
    # a leading rank of count 0 gives 0/0 (callers order empty ranks last).
    n = torch.zeros(mean_all.shape[1], dtype=torch.float64, device=mean_all.device)
    avg, m2 = torch.zeros_like(n), torch.zeros_like(n)
    for j in range(mean_all.shape[0]):
        count, m = counts[j].double(), mean_all[j].double()
        v = (1.0 / invstd_all[j].double() ** 2 - eps) * count
        factor = 1.0 / (n + count)
        m2 = m2 + v + (avg - m) ** 2 * n * count * factor
        avg = n * factor * avg + count * factor * m
        n = n + count
    if running_mean is not None:
        running_mean.lerp_(avg.to(running_mean.dtype), momentum)
    if running_var is not None:
        running_var.lerp_((m2 / (n - 1)).to(running_var.dtype), momentum)
    return avg.to(mean_all.dtype), torch.rsqrt(m2 / n + eps).to(mean_all.dtype)


def elemt_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                    eps: float) -> Tensor:
    acc = _acc(x)
    y = (x.to(acc) - _c(mean.to(acc), x)) * _c(invstd.to(acc), x)
    if weight is not None:
        y = y * _c(weight.to(acc), x)
    if bias is not None:
        y = y + _c(bias.to(acc), x)
    return y.to(x.dtype)


def backward_reduce_reference(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                              need_input: bool, need_weight: bool, need_bias: bool):
    acc, dims = _acc(x), _dims(x)
    dyf = dy.to(acc)
    sum_dy = dyf.sum(dims)
    sum_dy_xmu = (dyf * (x.to(acc) - _c(mean.to(acc), x))).sum(dims)
    gdtype = weight.dtype if weight is not None else x.dtype
    grad_weight = (sum_dy_xmu * invstd.to(acc)).to(gdtype) if need_weight else None
    grad_bias = sum_dy.to(gdtype) if need_bias else None
    if not need_input:
        sum_dy = sum_dy_xmu = None
    return sum_dy, sum_dy_xmu, grad_weight, grad_bias


def backward_elemt_reference(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                             sum_dy: Tensor, sum_dy_xmu: Tensor, counts: Tensor) -> Tensor:
    acc = _acc(x)
    total = counts.to(acc).sum()
    inv = invstd.to(acc)
    mean_dy, mean_dy_xmu = sum_dy.to(acc) / total, sum_dy_xmu.to(acc) / total
    scale = inv if weight is None else inv * weight.to(acc)
    xmu = x.to(acc) - _c(mean.to(acc), x)
    dx = (dy.to(acc) - _c(mean_dy, x) - xmu * _c(inv * inv * mean_dy_xmu, x)) * _c(scale, x)
    return dx.to(x.dtype)


REFERENCE = SimpleNamespace(stats=stats_reference, gather_stats_with_counts=gather_stats_with_counts_reference,
                            elemt=elemt_reference, backward_reduce=backward_reduce_reference,
                            backward_elemt=backward_elemt_reference)


def _native():
    return SimpleNamespace(stats=torch.batch_norm_stats,
                           gather_stats_with_counts=torch.batch_norm_gather_stats_with_counts,
                           elemt=torch.batch_norm_elemt, backward_reduce=torch.batch_norm_backward_reduce,
                           backward_elemt=torch.batch_norm_backward_elemt)


NATIVE = _native()


def ops_for(x: Union[Tensor, torch.device]) -> SimpleNamespace:
    """The fused CUDA kernels for CUDA tensors, the references on every other device."""
    device = x.device if isinstance(x, Tensor) else torch.device(x)
    return NATIVE if device.type == "cuda" else REFERENCE


__all__ = ["ops_for", "NATIVE", "REFERENCE"]
