"""Test-only: the kNN's two multi-rank paths on one rank of a 2-process gloo group.

    torchrun --standalone --nproc_per_node 2 tests/knn_shard_worker.py OUT

Each rank holds an uneven strided shard of one random bank and query set (the same seed
everywhere) and writes ``OUT/rank{r}.pt``: the scores of the gathered path, of the sharded
path (the bank kept per rank, per-query top-k merged) and the gathered bank.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as tdist


def problem(n_bank: int = 301, n_query: int = 77, dim: int = 24, classes: int = 5):
    g = torch.Generator().manual_seed(7)
    bank = torch.nn.functional.normalize(torch.randn(n_bank, dim, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    return (bank, torch.randint(0, classes, (n_bank,), generator=g),
            query, torch.randint(0, classes, (n_query,), generator=g), classes)


def shard(feats, labels, rank, world, drop=()):
    from fastbyol.eval.features import Features

    keep = [i for i in range(rank, feats.shape[0], world) if i not in drop]
    idx = torch.tensor(keep, dtype=torch.long)
    return Features(feats[idx], labels[idx], idx)


if __name__ == "__main__":
    from fastbyol.eval.knn import gather_bank, knn_scores_from_shards

    out = sys.argv[1]
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    bank, bank_y, query, query_y, classes = problem()
    b = shard(bank, bank_y, rank, world, drop=(4, 6, 8))  # rank 0 three rows short
    q = shard(query, query_y, rank, world)
    ks = (1, 10, 200, 400)  # 400 > a shard's 150 rows, < the bank's 298
    gathered, gi = knn_scores_from_shards(b, q, classes, ks, gather_budget=1 << 40)
    sharded, si = knn_scores_from_shards(b, q, classes, ks, gather_budget=0, sim_budget=4096)
    whole = gather_bank(b)
    torch.save({"gathered": gathered, "sharded": sharded, "paths": (gi["path"], si["path"]),
                "bank": whole.feats, "labels": whole.labels}, os.path.join(out, f"rank{rank}.pt"))
    tdist.barrier()
    tdist.destroy_process_group()
