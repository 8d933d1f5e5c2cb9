"""Weighted kNN monitor (Wu et al. 2018, InstDisc): k = 200, T = 0.1, cosine similarity.

Features are the encoder's (after global pooling), L2-normalised, computed in eval mode on
un-augmented images. Each query votes with ``exp(sim / T)`` over its k nearest bank
entries.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize
from .backbones import memory_format_of
from .config import AugmentConfig
from .errors import FastByolError


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, aug: AugmentConfig
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features ``[N, d]`` (float32) and labels ``[N]`` of a uint8 loader."""
    was_training, layout = encoder.training, memory_format_of(encoder)
    encoder.eval()
    feats, labels = [], []
    for images, y, _bad in loader:
        if images is None:
            continue
        x = normalize(images.to(device).float().div_(255.0), aug).contiguous(memory_format=layout)
        feats.append(F.normalize(encoder(x).float(), dim=1))
        labels.append(y.to(device))
    encoder.train(was_training)
    if not feats:
        raise FastByolError("the kNN image set holds no readable image")
    return torch.cat(feats), torch.cat(labels)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each (normalised) query row by temperature-weighted kNN voting."""
    k = min(k, bank.shape[0])
    preds = []
    for q in query.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / t).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(encoder: nn.Module, bank_loader, query_loader, num_classes: int, device: torch.device,
                 aug: AugmentConfig, k: int = 200, t: float = 0.1) -> float:
    """Top-1 accuracy (percent) of weighted kNN: bank = labelled training images,
    queries = the held-out set."""
    bank, bank_labels = extract_features(encoder, bank_loader, device, aug)
    query, query_labels = extract_features(encoder, query_loader, device, aug)
    pred = knn_predict(query, bank, bank_labels, num_classes, k, t)
    return 100.0 * (pred == query_labels).float().mean().item()
