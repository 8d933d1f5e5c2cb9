"""Frozen-encoder features, computed once per rank on its shard and gathered.

One extractor serves the kNN monitor in training, ``fastbyol eval knn`` and the linear
probe. The encoder runs in eval mode (BatchNorm on its running statistics, so a sample's
feature does not depend on its batch), under bf16 autocast with channels_last inputs on CUDA,
and nothing is read back to the host per batch: with several ranks the host syncs are the size
exchange of :func:`gather_rows` and the sum of unreadable files, once each per extraction.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from ..augment import normalize
from ..backbones import feature_dim, memory_format_of
from ..config import AugmentConfig
from ..distributed import rank_and_world, sum_over_ranks


def inference_autocast(device: torch.device):
    """bf16 autocast on CUDA (the encoder's inference speed); fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, device: torch.device, aug: AugmentConfig) -> torch.Tensor:
    """Pooled features ``[n, d]`` (float32) of uint8 images ``[n, 3, S, S]``; the encoder is
    expected in eval mode. No host sync."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    x = normalize(x, aug).contiguous(memory_format=memory_format_of(encoder))
    with inference_autocast(device):
        return encoder(x).float()


@dataclass
class Features:
    """Rows of features with their labels and sample indices (all on one device)."""

    feats: torch.Tensor  # [n, d] float32
    labels: torch.Tensor  # [n] int64
    index: torch.Tensor  # [n] int64: position of each row's sample in its source
    unreadable: int = 0  # files dropped (this rank, or all ranks after gather)

    def __len__(self) -> int:
        return self.feats.shape[0]

    def rows(self, keep: torch.Tensor) -> "Features":
        return Features(self.feats[keep], self.labels[keep], self.index[keep], self.unreadable)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, aug: AugmentConfig,
                     l2_normalize: bool = True, gather: bool = True, dtype: torch.dtype = torch.float32
                     ) -> Features:
    """Features of every readable image a loader of ``(uint8 images, labels, indices,
    unreadable)`` batches yields (:mod:`fastbyol.data.eval_views`).

    With ``gather`` (and a process group), every rank's rows are gathered and put in sample
    order, so every rank holds what one process would have computed; otherwise this rank's.
    ``l2_normalize``: unit rows (kNN); off for the linear probe (raw pooled features).
    ``dtype``: the stored rows' (bf16 for a kNN bank on CUDA: half the memory), cast per batch.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels, index, bad = [], [], [], 0
    try:
        for images, y, idx, n_bad in loader:
            bad += n_bad
            if images is None:
                continue
            f = encode(encoder, images, device, aug)
            feats.append((F.normalize(f, dim=1) if l2_normalize else f).to(dtype))
            labels.append(y.to(device, non_blocking=True))
            index.append(idx.to(device, non_blocking=True))
        if not feats:  # this rank read nothing: empty rows of the right width
            dim = feature_dim(encoder, loader.dataset.size)
            out = Features(torch.empty(0, dim, device=device, dtype=dtype), torch.empty(0, dtype=torch.long, device=device),
                           torch.empty(0, dtype=torch.long, device=device), bad)
        else:
            out = Features(torch.cat(feats), torch.cat(labels), torch.cat(index), bad)
    finally:
        encoder.train(was_training)
    return gather_features(out) if gather else out


def gather_rows(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Every rank's rows of each tensor, concatenated rank after rank (same on all ranks).
    Ranks may hold different row counts: one size exchange, then padded all-gathers."""
    rank, world = rank_and_world()
    if world == 1:
        return tensors
    device = tensors[0].device
    n = torch.tensor([tensors[0].shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    sizes = [int(s) for s in torch.cat(sizes).tolist()]  # the one host sync
    cap = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((cap,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        tdist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
    return tuple(out)


def gather_features(f: Features) -> Features:
    """All ranks' rows of ``f``, in sample order (what one process computes)."""
    if rank_and_world()[1] == 1:
        return f
    feats, labels, index = gather_rows(f.feats, f.labels, f.index)
    order = torch.argsort(index)
    bad = sum_over_ranks(f.unreadable, f.feats.device)
    return Features(feats[order], labels[order], index[order], bad)
