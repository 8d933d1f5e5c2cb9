"""Synchronised BatchNorm without host syncs: one all-reduce per layer and direction.

BYOL normalises each view with batch statistics over all devices (BYOL_SPEC; the paper's
4096-image batches). This is ``nn.SyncBatchNorm``'s algorithm on the same fused kernels
(:mod:`fastbyol.batchnorm_ops`: PyTorch's CUDA kernels on a GPU, a PyTorch reference of each
elsewhere), without its host sync (a ``.item()`` on the counts) and with one all-reduce in
place of its all-gather, so it runs on any backend (NCCL, gloo) and is tested on CPU:

* forward: ``stats`` gives this rank's (mean, invstd); each rank writes them and its count
  into its own row of a zeroed ``[W, 2C + 1]`` buffer, and one all-reduce (a sum of rows that
  are zero but one) hands every rank every row; sorted by count (an empty rank last, without
  ``nn.SyncBatchNorm``'s host-syncing mask), ``gather_stats_with_counts`` combines them
  (Chan's parallel variance: no cancellation, however far the mean lies from 0) and updates
  the running statistics (global mean, unbiased global variance, identical on every rank);
  ``elemt`` normalises;
* backward: ``backward_reduce`` gives ``(Σ dy, Σ dy·(x − mean))`` and the local weight and
  bias gradients (the data-parallel engine all-reduces parameter gradients); one all-reduce
  of the two sums; ``backward_elemt`` gives dx, accounting for every rank's use of the
  shared statistics.

Memory traffic is a local BatchNorm's: x read twice and y written once forward; dy and x read
twice and dx written once backward (plus per-channel vectors).

In training mode the statistics are global. In eval mode the layer is a local BatchNorm:
running statistics when tracked, else this rank's own batch statistics (no collective, so
ranks with different batch sizes, or only some ranks evaluating, cannot hang). With no
process group (one process) it is plain ``F.batch_norm``.

Examples:
    >>> net = convert_to_sync_free(torchvision.models.resnet50())  # every BatchNorm, names kept
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from .batchnorm_ops import ops_for


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the default process group, queued on the device stream (no host sync)."""
    tdist.all_reduce(t)
    return t


def _own_row(ops, x: torch.Tensor, eps: float, world: int, rank: int) -> torch.Tensor:
    """``[W, 2C + 1]`` zeros but row ``rank``: this rank's (mean, invstd, count). Summed over
    ranks (one all-reduce) it is every rank's row: an all-gather that tolerates any count."""
    c = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = torch.zeros(world, 2 * c + 1, dtype=acc, device=x.device)
    mine = rows[rank]
    if x.numel():
        mine[:c], mine[c:2 * c] = ops.stats(x, eps)
        mine[2 * c:].fill_(x.numel() // c)  # a device fill: no upload, no sync
    else:  # an empty shard: count 0, mean 0 and invstd 1 (finite: the combine multiplies it by 0)
        mine[c:2 * c] = 1.0
    return rows


def _gathered(rows: torch.Tensor):
    """(mean_all, invstd_all, counts) of every rank, empty ranks last. The fused combine is a
    running Welford merge that divides by the count so far, so a leading empty rank would give
    0/0; ``nn.SyncBatchNorm`` drops empty ranks with a boolean mask (a host sync), sorting by
    count needs none."""
    c = (rows.shape[1] - 1) // 2
    rows = rows[torch.argsort(rows[:, 2 * c], descending=True, stable=True)]
    return rows[:, :c], rows[:, c:2 * c], rows[:, 2 * c]


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps: float):
        ops = ops_for(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        # Parameters in the statistics' dtype (fp32): a bf16/fp16 model's kernels then take
        # the mixed (low-precision data, fp32 parameters) path; gradients are cast back.
        wf = None if weight is None else weight.float()
        bf = None if bias is None else bias.float()
        mean_all, invstd_all, counts = _gathered(_all_reduce_sum(_own_row(ops, x, eps, tdist.get_world_size(),
                                                                          tdist.get_rank())))
        mean = mean_all[0]  # (its dtype and device)
        if running_mean is not None and (isinstance(factor, torch.Tensor) or running_mean.dtype != mean.dtype):
            # momentum=None's 1/num_batches_tracked is a device tensor, and the kernel takes a
            # Python float (reading it would sync): the batch's statistics land in scratch
            # buffers (momentum 1), then lerp into the running ones by the tensor.
            batch_mean, batch_var = torch.zeros_like(mean), torch.zeros_like(mean)
            mean, invstd = ops.gather_stats_with_counts(x, mean_all, invstd_all, batch_mean, batch_var, 1.0, eps,
                                                        counts)
            with torch.no_grad():
                running_mean.lerp_(batch_mean.to(running_mean.dtype), factor)
                running_var.lerp_(batch_var.to(running_var.dtype), factor)
        else:
            mean, invstd = ops.gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var,
                                                        float(factor), eps, counts)
        y = ops.elemt(x, wf, bf, mean, invstd, eps) if x.numel() else torch.empty_like(x)
        ctx.save_for_backward(x, weight, mean, invstd, counts.to(torch.int32))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        ops = ops_for(x)
        c = x.shape[1]
        if not (dy.is_contiguous() or dy.is_contiguous(memory_format=torch.channels_last)):
            dy = dy.contiguous()
        wf = None if weight is None else weight.float()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.numel():
            sum_dy, sum_dy_xmu, grad_w, grad_b = ops.backward_reduce(dy, x, mean, invstd, wf, need_x,
                                                                     need_w and weight is not None,
                                                                     need_b and weight is not None)
        else:  # an empty shard still joins the all-reduce, with zeros
            sum_dy = sum_dy_xmu = torch.zeros_like(mean)
            grad_w = torch.zeros_like(mean) if need_w and weight is not None else None
            grad_b = torch.zeros_like(mean) if need_b and weight is not None else None
        grad_x = None
        if need_x:
            sums = _all_reduce_sum(torch.cat([sum_dy, sum_dy_xmu]))
            grad_x = (ops.backward_elemt(dy, x, mean, invstd, wf, sums[:c], sums[c:], counts) if x.numel()
                      else torch.zeros_like(x))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(weight.dtype)
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
        # Only training synchronises (as nn.SyncBatchNorm): eval without running statistics
        # normalises by this rank's batch, with no collective another rank might not join.
        if not self.training or not (tdist.is_available() and tdist.is_initialized()):
            return super().forward(x)
        factor = self.momentum
        track = self.track_running_stats
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
