"""Weighted kNN monitor (Wu et al. 2018, InstDisc): k = 200, T = 0.1, cosine similarity.

Features are the encoder's (after global pooling), L2-normalised, computed in eval mode on
un-augmented images (:func:`fastbyol.eval.features.extract_features`). Each query votes with
``exp(sim / T)`` over its k nearest bank entries.

Sharded over ranks: each rank extracts its shard of the bank and of the queries, the bank is
gathered onto every rank, each rank votes for its own queries, and the counts of correct
answers are summed. No rank idles, and the result equals one process's.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..config import AugmentConfig
from ..errors import FastByolError
from ..distributed import all_reduce_sum
from .features import Features, extract_features


def knn_votes_per_k(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                    ks: Sequence[int] = (200,), t: float = 0.1, chunk: int = 1024) -> List[torch.Tensor]:
    """For each ``k``, the class votes ``[n, num_classes]`` of each (normalised) query row: the
    sum of ``exp(sim / t)`` over its ``k`` most similar bank rows, per class. One similarity
    product and one top-k (of the largest k, sorted) serve every k."""
    top = min(max(ks), bank.shape[0])
    out: List[List[torch.Tensor]] = [[] for _ in ks]
    for q in query.split(chunk):
        sim, idx = (q @ bank.T).topk(top, dim=1)
        weights, labels = (sim / t).exp(), bank_labels[idx]
        for votes_k, k in zip(out, ks):
            k = min(k, top)
            votes = torch.zeros(q.shape[0], num_classes, device=q.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])
            votes_k.append(votes)
    return [torch.cat(v) if v else torch.zeros(0, num_classes, device=query.device) for v in out]


def knn_votes(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
              k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class votes ``[n, num_classes]`` of each (normalised) query row for one ``k``
    (:func:`knn_votes_per_k`)."""
    return knn_votes_per_k(query, bank, bank_labels, num_classes, (k,), t, chunk)[0]


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each (normalised) query row by temperature-weighted kNN voting."""
    return knn_votes(query, bank, bank_labels, num_classes, k, t, chunk).argmax(1)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of rows whose label is among the ``k`` best scores, for each ``k`` (float
    tensor on the scores' device; no host sync)."""
    best = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = best == labels[:, None]
    return torch.stack([hit[:, :k].any(1).sum() for k in ks]).float()


def knn_scores(bank: Features, query: Features, num_classes: int, ks: Sequence[int] = (200,), t: float = 0.1
               ) -> Dict[int, Tuple[float, float]]:
    """``{k: (top-1 %, top-5 %)}`` of weighted kNN; ``bank`` is the whole bank (gathered),
    ``query`` this rank's queries; counts are summed over ranks."""
    votes = knn_votes_per_k(query.feats, bank.feats, bank.labels, num_classes, ks, t)
    counts = torch.stack([torch.cat([topk_correct(v, query.labels), query.feats.new_tensor([len(query)])])
                          for v in votes])
    counts = all_reduce_sum(counts).tolist()  # one host sync for all k
    total = counts[0][2]
    if total == 0:
        raise FastByolError("the kNN query set holds no readable image")
    return {k: (100.0 * c[0] / total, 100.0 * c[1] / total) for k, c in zip(ks, counts)}


def knn_accuracy(encoder: nn.Module, bank_loader, query_loader, num_classes: int, device: torch.device,
                 aug: AugmentConfig, k: int = 200, t: float = 0.1) -> float:
    """Top-1 accuracy (percent) of weighted kNN: bank = labelled training images,
    queries = the held-out set. Loaders give this rank's shard (see the module doc)."""
    bank = extract_features(encoder, bank_loader, device, aug)
    if len(bank) == 0:
        raise FastByolError("the kNN image set holds no readable image")
    query = extract_features(encoder, query_loader, device, aug, gather=False)
    return knn_scores(bank, query, num_classes, (k,), t)[k][0]
