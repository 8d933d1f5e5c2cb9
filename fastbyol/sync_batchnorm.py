"""Synchronised BatchNorm without host syncs: one all-reduce per layer and direction.

BYOL normalises each view with batch statistics over all devices (BYOL_SPEC; the paper's
4096-image batches). PyTorch's ``nn.SyncBatchNorm`` gets there with a host sync per forward
and a blocking all-gather of every rank's (mean, invstd, count), and has no CPU kernels. The same
maths fits one all-reduce of per-channel sums:

* forward: each rank's count ``n_r``, mean ``m_r`` and centred sum of squares ``M2_r``
  (``torch.var_mean``, accurate in fp32) are all-reduced as ``(n_r·m_r, M2_r + n_r·m_r², n_r)``
  in **float64**; then ``mean = S1/N``, ``var = S2/N − mean²``. The subtraction cancels when
  ``|mean| ≫ std``; float64 keeps ~16 digits, so even a mean 10⁴ standard deviations from 0
  leaves ~8 correct digits of the variance (an fp32 sum of squares would leave none);
* backward: ``(Σ dy, Σ dy·(x − mean))`` all-reduced (fp32), as ``nn.SyncBatchNorm`` does, so
  the input gradient accounts for every rank's use of the shared statistics. Weight and bias
  gradients stay local sums: the data-parallel engine all-reduces parameter gradients.

Running statistics get the global mean and the unbiased global variance, identically on every
rank. With no process group (one process) the layer is plain ``F.batch_norm``; in eval mode it
uses the running statistics like any BatchNorm. Works on any backend (NCCL, gloo), so it is
tested on CPU.

Examples:
    >>> net = convert_to_sync_free(torchvision.models.resnet50())  # every BatchNorm, names kept
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the default process group, queued on the device stream (no host sync)."""
    tdist.all_reduce(t)
    return t


def _shape(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (dim - 2)))


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps: float):
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x.float()
        n = x.numel() // c
        var_r, mean_r = torch.var_mean(xf, dim=dims, correction=0)
        m = mean_r.double()
        ones = torch.ones(1, dtype=torch.float64, device=x.device)
        sums = _all_reduce_sum(torch.cat([m * n, (var_r.double() + m * m) * n, ones * n]))
        count = sums[2 * c:]
        mean64 = sums[:c] / count
        var64 = (sums[c:2 * c] / count - mean64 * mean64).clamp_min_(0)
        mean, var = mean64.float(), var64.float()
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
                unbiased = var64 * count / (count - 1).clamp_min_(1)
                running_var.lerp_(unbiased.to(running_var.dtype), factor)
        scale = invstd if weight is None else invstd * weight.float()
        shift = -mean * scale if bias is None else bias.float() - mean * scale
        y = torch.addcmul(_shape(shift, x.dim()), xf, _shape(scale, x.dim()))
        ctx.save_for_backward(x, weight, mean, invstd, count.float())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        c, dims, d = x.shape[1], [0, *range(2, x.dim())], x.dim()
        dyf, xmu = dy.float(), x.float() - _shape(mean, d)
        sum_dy, sum_dy_xmu = dyf.sum(dims), (dyf * xmu).sum(dims)
        grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = _all_reduce_sum(torch.cat([sum_dy, sum_dy_xmu]))
            mean_dy, mean_dy_xmu = sums[:c] / count, sums[c:] / count
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = ((dyf - _shape(mean_dy, d) - xmu * _shape(invstd * invstd * mean_dy_xmu, d))
                      * _shape(scale, d)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class SyncFreeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over ``[N, C, *]`` inputs with statistics over all ranks (see the module doc).

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d/2d/3d``.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions [N, C, ...], got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not use_batch or not (tdist.is_available() and tdist.is_initialized()):
            return super().forward(x)
        factor = self.momentum
        track = self.training and self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative average, without the host sync of float(num_batches_tracked)
                factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean if track else None,
                                      self.running_var if track else None, factor if track else 0.0, self.eps)


def convert_to_sync_free(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by a :class:`SyncFreeBatchNorm` holding the same
    parameters and buffers (module names unchanged, so state dicts and EMA pairings still
    match). Returns the new root when ``module`` itself is a BatchNorm."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncFreeBatchNorm):
        out = SyncFreeBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_to_sync_free(child))
    return out


__all__ = ["SyncFreeBatchNorm", "convert_to_sync_free"]
