"""Weighted kNN monitor (Wu et al. 2018, InstDisc): k = 200, T = 0.1, cosine similarity.

Features are the encoder's (after global pooling), L2-normalised, computed in eval mode on
un-augmented images (:func:`fastbyol.eval.features.extract_features`). Each query votes with
``exp(sim / T)`` over its k nearest bank entries.

Sharded over ranks: each rank extracts its shard of the bank and of the queries. Then
(:func:`knn_scores_from_shards`), whichever fits:

* **gathered** (banks up to ``gather_budget`` bytes, e.g. the training monitor's 50,000 rows):
  the bank is gathered onto every rank into one preallocated tensor, each rank votes for its
  own queries, and the counts of correct answers are summed;
* **sharded** (larger banks, e.g. all 1.28 M ImageNet images: 5.2 GB in bf16, 9.8 GB in fp32,
  on every rank): each rank keeps its shard of the bank; the (small) query set is gathered,
  each rank finds every query's top-k in its shard, and the ranks merge those ``k`` rows per
  query (``world * k`` candidates: the global top-k is among them) before voting.

Either way the result is one process's (up to ties in similarity). On CUDA the bank is
bf16 (half the memory; similarities are accumulated and returned in fp32, votes summed in fp32),
and the similarity chunk is sized to ``sim_budget`` bytes.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
from torch import nn

from ..config import AugmentConfig
from ..errors import FastByolError
from ..distributed import all_reduce_sum, rank_and_world
from .features import Features, extract_features, gather_rows

GATHER_BUDGET = 2 << 30  # bytes of bank above which the bank stays sharded (fits a 16 GB card beside a ResNet-50)
SIM_BUDGET = 512 << 20  # bytes one similarity chunk may take


def bank_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the tensor cores' input type, half of fp32's memory); fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def similarity(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``query @ bank.T`` in fp32 ``[n, m]``, whatever the bank's dtype: a bf16 product
    accumulates in fp32 and, on CUDA, is written out in fp32 too (no bf16 rounding of the
    similarities, which would tie neighbours)."""
    if bank.dtype in (torch.float32, torch.float64):
        return query.to(bank.dtype) @ bank.T
    if bank.is_cuda:
        try:
            return torch.mm(query.to(bank.dtype), bank.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype: rounded to bf16, then fp32
            return (query.to(bank.dtype) @ bank.T).float()
    return query.to(bank.dtype).float() @ bank.T.float()  # CPU: no fp32-output bf16 product; upcast (tests)


def sim_chunk_rows(bank_rows: int, budget: int = SIM_BUDGET, bank_itemsize: int = 4) -> int:
    """Query rows per similarity chunk so that the chunk (fp32, plus the product's own output
    when the bank is not fp32) takes at most ``budget`` bytes."""
    per_row = max(1, bank_rows) * (4 + (bank_itemsize if bank_itemsize != 4 else 0))
    return max(1, min(65536, budget // per_row))


def _topk_chunks(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, top: int,
                 chunk: Optional[int], sim_budget: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(similarities [c, top] fp32, descending; labels [c, top])`` chunk by chunk of queries."""
    rows = chunk or sim_chunk_rows(bank.shape[0], sim_budget, bank.element_size())
    for q in query.split(rows):
        sim, idx = similarity(q, bank).topk(top, dim=1)
        yield sim, bank_labels[idx]


def _votes(sim: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], num_classes: int, t: float
           ) -> List[torch.Tensor]:
    """Per ``k``: fp32 class votes ``[c, num_classes]``, the sum of ``exp(sim / t)`` over the first
    ``k`` columns (neighbours sorted by similarity)."""
    weights, out = (sim.float() / t).exp(), []
    for k in ks:
        k = min(k, sim.shape[1])
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[:, :k], weights[:, :k])
        out.append(votes)
    return out


def knn_votes_per_k(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                    ks: Sequence[int] = (200,), t: float = 0.1, chunk: Optional[int] = None,
                    sim_budget: int = SIM_BUDGET) -> List[torch.Tensor]:
    """For each ``k``, the class votes ``[n, num_classes]`` of each (normalised) query row: the
    sum of ``exp(sim / t)`` over its ``k`` most similar bank rows, per class. One similarity
    product and one top-k (of the largest k, sorted) serve every k; queries go ``chunk`` rows
    at a time (default: as many as ``sim_budget`` bytes of similarities allow)."""
    top = min(max(ks), bank.shape[0])
    out: List[List[torch.Tensor]] = [[] for _ in ks]
    for sim, labels in _topk_chunks(query, bank, bank_labels, top, chunk, sim_budget):
        for votes_k, votes in zip(out, _votes(sim, labels, ks, num_classes, t)):
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


def knn_scores(bank: Features, query: Features, num_classes: int, ks: Sequence[int] = (200,), t: float = 0.1,
               sim_budget: int = SIM_BUDGET) -> Dict[int, Tuple[float, float]]:
    """``{k: (top-1 %, top-5 %)}`` of weighted kNN; ``bank`` is the whole bank (gathered),
    ``query`` this rank's queries; counts are summed over ranks."""
    votes = knn_votes_per_k(query.feats, bank.feats, bank.labels, num_classes, ks, t, sim_budget=sim_budget)
    counts = torch.stack([torch.cat([topk_correct(v, query.labels), query.feats.new_tensor([len(query)])])
                          for v in votes])
    return _percent(all_reduce_sum(counts).tolist(), ks)  # one host sync for all k


def _percent(counts: List[List[float]], ks: Sequence[int]) -> Dict[int, Tuple[float, float]]:
    """``{k: (top-1 %, top-5 %)}`` from per-k ``(top-1 hits, top-5 hits, queries)``."""
    total = counts[0][2]
    if total == 0:
        raise FastByolError("the kNN query set holds no readable image")
    return {k: (100.0 * c[0] / total, 100.0 * c[1] / total) for k, c in zip(ks, counts)}


def knn_accuracy(encoder: nn.Module, bank_loader, query_loader, num_classes: int, device: torch.device,
                 aug: AugmentConfig, k: int = 200, t: float = 0.1) -> float:
    """Top-1 accuracy (percent) of weighted kNN: bank = labelled training images,
    queries = the held-out set. Loaders give this rank's shard (see the module doc)."""
    dtype = bank_dtype(device)
    bank = extract_features(encoder, bank_loader, device, aug, gather=False, dtype=dtype)
    query = extract_features(encoder, query_loader, device, aug, gather=False, dtype=dtype)
    return knn_scores_from_shards(bank, query, num_classes, (k,), t)[0][k][0]


def gather_bank(f: Features) -> Features:
    """Every rank's rows of a bank into one preallocated tensor, rank after rank (not in
    sample order: the votes do not depend on the bank's order). Peak memory: the bank plus
    ``world`` rows of padding, instead of the padded copies, their concatenation and a
    sample-order copy (3-4 banks) of :func:`~fastbyol.eval.features.gather_features`."""
    rank, world = rank_and_world()
    if world == 1:
        return f
    sizes = torch.tensor([len(f)], device=f.feats.device)
    parts = [torch.zeros_like(sizes) for _ in range(world)]
    tdist.all_gather(parts, sizes)
    sizes = torch.cat(parts).tolist()  # the one host sync
    cap, total = max(sizes), sum(sizes)
    out = []
    for t in (f.feats, f.labels):
        buf = t.new_empty((world * cap,) + tuple(t.shape[1:]))
        buf[rank * cap: rank * cap + t.shape[0]].copy_(t)
        slot = buf.narrow(0, rank * cap, cap).clone()  # 1/world of the bank: the collectives' input
        if t.is_cuda:
            tdist.all_gather_into_tensor(buf, slot)
        else:  # gloo: gather into views of the one buffer
            tdist.all_gather(list(buf.view((world, cap) + tuple(t.shape[1:])).unbind(0)), slot)
        # close the padding gaps: move each rank's rows left, 8192 rows at a time through a copy
        at = 0
        for r, n in enumerate(sizes):
            if at != r * cap:
                for src in range(r * cap, r * cap + n, 8192):
                    piece = buf[src:min(src + 8192, r * cap + n)].clone()
                    buf[at + src - r * cap: at + src - r * cap + piece.shape[0]].copy_(piece)
            at += n
        out.append(buf[:total])
    return Features(out[0], out[1], torch.empty(0, dtype=torch.long, device=f.feats.device), f.unreadable)


def sharded_knn_counts(bank: Features, query: Features, num_classes: int, ks: Sequence[int], t: float,
                       sim_budget: int = SIM_BUDGET) -> torch.Tensor:
    """Counts ``[len(ks), 3]`` (top-1 hits, top-5 hits, queries) over all ranks' queries, with
    each rank's bank left where it is: every query's top-k rows are found in each shard and
    merged (the global top-k lies among the ``world * k`` candidates). Same on every rank."""
    _, world = rank_and_world()
    feats, labels = gather_rows(query.feats, query.labels)  # the queries (50,000 x 2048 bf16: 0.2 GB) everywhere
    top = max(ks)
    rows = sim_chunk_rows(len(bank), sim_budget, bank.feats.element_size())
    counts = torch.zeros(len(ks), 3, device=feats.device)
    for q, y in zip(feats.split(rows), labels.split(rows)):
        local = min(top, len(bank))
        if local:
            sim, idx = similarity(q, bank.feats).topk(local, dim=1)
            lab = bank.labels[idx]
        else:
            sim, lab = q.new_empty(q.shape[0], 0, dtype=torch.float32), y.new_empty(q.shape[0], 0)
        pad = top - local  # a shard smaller than k: -inf candidates never win
        if pad:
            sim = torch.cat([sim, sim.new_full((q.shape[0], pad), float("-inf"))], 1)
            lab = torch.cat([lab, lab.new_zeros(q.shape[0], pad)], 1)
        if world > 1:
            sims, labs = torch.empty((world,) + sim.shape, device=sim.device), lab.new_empty((world,) + lab.shape)
            tdist.all_gather(list(sims.unbind(0)), sim.contiguous())
            tdist.all_gather(list(labs.unbind(0)), lab.contiguous())
            sim, lab = sims.permute(1, 0, 2).reshape(q.shape[0], -1), labs.permute(1, 0, 2).reshape(q.shape[0], -1)
        best, pos = sim.topk(top, dim=1)  # padding (-inf) weighs exp(-inf) = 0
        for row, votes in enumerate(_votes(best, lab.gather(1, pos), ks, num_classes, t)):
            counts[row, :2] += topk_correct(votes, y)
            counts[row, 2] += q.shape[0]
    return counts


def knn_scores_from_shards(bank: Features, query: Features, num_classes: int, ks: Sequence[int] = (200,),
                           t: float = 0.1, gather_budget: int = GATHER_BUDGET, sim_budget: int = SIM_BUDGET
                           ) -> Tuple[Dict[int, Tuple[float, float]], Dict]:
    """``({k: (top-1 %, top-5 %)}, info)`` of weighted kNN from this rank's shards of the bank
    and of the queries (see the module doc for the two paths); ``info``: the bank's size, the
    path taken and the unreadable files of bank and queries, over all ranks."""
    device = bank.feats.device
    sizes = all_reduce_sum(torch.tensor([len(bank), len(query), bank.unreadable, query.unreadable],
                                        device=device, dtype=torch.int64)).tolist()
    n_bank, n_query = sizes[0], sizes[1]
    if n_bank == 0:
        raise FastByolError("the kNN bank holds no readable image")
    if n_query == 0:
        raise FastByolError("the kNN query set holds no readable image")
    nbytes = n_bank * bank.feats.shape[1] * bank.feats.element_size()
    sharded = rank_and_world()[1] > 1 and nbytes > gather_budget
    if sharded:
        scores = _percent(sharded_knn_counts(bank, query, num_classes, ks, t, sim_budget).tolist(), ks)
    else:
        whole = gather_bank(bank)
        del bank  # this rank's shard, copied into the gathered bank: not held twice while voting
        scores = knn_scores(whole, query, num_classes, ks, t, sim_budget)
    return scores, {"bank_images": n_bank, "bank_bytes": nbytes, "path": "sharded" if sharded else "gathered",
                    "unreadable": sizes[2], "query_unreadable": sizes[3]}
