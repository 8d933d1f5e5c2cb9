"""ImageNet scale: the numpy index (folders, shards), its cache and lock, the one-pass hold-out
split, the kNN's bf16 bank and its sharded merge (2 gloo ranks), the scale benchmark on a tiny tree."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastbyol.data.image_source import ImageSource, PathList
from fastbyol.data.sources import scan_image_folder, split_holdout

from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))


def test_path_list_is_a_sequence_of_strings():
    paths = ["/r/a/1.jpg", "/r/b/x/2.jpg", "/r/a/é.jpg"]
    p = PathList.from_strings(paths)
    assert list(p) == paths and p[2] == paths[2] and len(p) == 3 and p == paths
    assert list(p.subset(np.array([2, 0]))) == [paths[2], paths[0]] and list(p[1:]) == paths[1:]
    src = ImageSource(labels=np.array([0, 1, 0]), classes=["a", "b"], files=paths)
    assert isinstance(src.files, PathList) and list(src.subset([1]).files) == [paths[1]]


def test_folder_index_matches_a_walk_and_is_cached_until_a_folder_changes(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    os.makedirs(os.path.join(root, "class1", "sub"))
    make_image_folder(tmp_path / "tmp", classes=1, per_class=2)
    for n in os.listdir(tmp_path / "tmp" / "class0"):
        os.replace(tmp_path / "tmp" / "class0" / n, os.path.join(root, "class1", "sub", n))
    walked = []
    for c in sorted(os.listdir(root)):
        for d, dirs, names in os.walk(os.path.join(root, c)):
            dirs.sort()
            walked += [os.path.join(d, n) for n in sorted(names)]
    first = scan_image_folder(root)
    assert list(first.files) == walked and first.labels.tolist() == [0] * 4 + [1] * 6 + [2] * 4

    from fastbyol.data import sources
    calls = []
    real = sources._scan_folder
    monkeypatch.setattr(sources, "_scan_folder", lambda r: calls.append(r) or real(r))
    again = scan_image_folder(root)
    assert calls == [] and again.files == first.files and np.array_equal(again.labels, first.labels)
    time.sleep(0.01)
    open(os.path.join(root, "class1", "sub", "new.jpg"), "wb").write(open(walked[0], "rb").read())
    renewed = scan_image_folder(root)
    assert calls == [root] and len(renewed) == len(first) + 1


def test_hold_out_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [1, 2, 10, 37])
    src = ImageSource(labels=labels, classes=list("abcd"), files=[f"/d/{i}.jpg" for i in range(len(labels))])
    train, val = split_holdout(src, 0.2, seed=3)
    assert np.bincount(val.labels, minlength=4).tolist() == [0, 1, 2, 7]
    assert sorted(list(train.files) + list(val.files)) == sorted(src.files)
    assert split_holdout(src, 0.2, seed=3)[1].files == val.files


def test_bf16_bank_votes_match_fp32():
    from fastbyol.eval.knn import knn_votes_per_k, sim_chunk_rows

    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(333, 40, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(29, 40, generator=g), dim=1)
    labels = torch.randint(0, 6, (333,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        # the reference: float64 maths on the same (rounded) inputs; the chunk budget forces 4 chunks
        ref = knn_votes_per_k(query.to(dtype).double(), bank.to(dtype).double(), labels, 6, (5, 50), 0.1)
        got = knn_votes_per_k(query, bank.to(dtype), labels, 6, (5, 50), 0.1, sim_budget=333 * 8 * 8)
        for a, b in zip(got, ref):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)
    assert sim_chunk_rows(1_281_167, 512 << 20, 2) == (512 << 20) // (1_281_167 * 6)


def test_sharded_knn_merge_equals_the_gathered_bank_and_one_process(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from knn_shard_worker import problem
    from fastbyol.eval.knn import knn_votes_per_k, topk_correct

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "tests", "knn_shard_worker.py"), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    bank, bank_y, query, query_y, classes = problem()
    keep = torch.tensor([i for i in range(len(bank)) if i not in (4, 6, 8)])
    ks = (1, 10, 200, 400)
    votes = knn_votes_per_k(query, bank[keep], bank_y[keep], classes, ks, 0.1)
    one = {k: tuple((100.0 * topk_correct(v, query_y) / len(query)).tolist()) for k, v in zip(ks, votes)}
    for r in (0, 1):
        two = torch.load(tmp_path / f"rank{r}.pt")
        assert two["paths"] == ("gathered", "sharded")
        for k in ks:
            assert two["gathered"][k] == pytest.approx(one[k]) and two["sharded"][k] == pytest.approx(one[k])
        rows = torch.cat([keep[keep % 2 == 0], keep[keep % 2 == 1]])  # rank 0's rows, then rank 1's
        assert torch.equal(two["bank"], bank[rows]) and torch.equal(two["labels"], bank_y[rows])


@pytest.mark.slow  # ~60 s: spawns a dozen interpreters
def test_scale_benchmark_on_a_tiny_tree(tmp_path):
    """benchmarks/bench_scale.py end to end on 240 files: every figure is there and sane."""
    from fastbyol.bench.scale import main

    res = main(["--root", str(tmp_path / "tree"), "--train", "240", "--val", "24", "--classes", "4",
                "--per-shard", "60", "--ranks", "2", "--out", str(tmp_path / "out")])
    assert os.path.isfile(tmp_path / "out" / "scale_cpu_240.json")
    assert res["index"]["files"] == res["index_warm_cache"]["files"] == 240 and res["index"]["classes"] == 4
    assert len(os.listdir(tmp_path / "tree" / "val" / "n00000003")) == 6
    first = res["shards_first_run"]
    assert [r["samples"] for r in first] == [240, 240] and sorted(r["shards_read_here"] for r in first) == [0, 4]
    assert all(r["shards_read_here"] == 0 for r in res["shards_warm"])
    assert res["launch_warm_cache"]["train"] + res["launch_warm_cache"]["holdout"] == 240
    assert {w["kind"] for w in res["workers"]} == {"numpy", "list"}


def test_simulated_tree_and_shards_index_alike(tmp_path):
    """The benchmark's tree (hard links) and its tar shards give the same labels, file for file."""
    from fastbyol.bench.scale_tree import build_shards, build_tree
    from fastbyol.data.webdataset import scan_webdataset

    build_tree(str(tmp_path), train=250, val=20, classes=4)
    build_shards(str(tmp_path), train=250, classes=4, per_shard=64)
    folders, shards = scan_image_folder(str(tmp_path / "train")), scan_webdataset(str(tmp_path / "shards"))
    assert len(folders) == len(shards) == 250 and len(shards.tar.shards) == 4
    assert np.bincount(folders.labels).tolist() == np.bincount(shards.labels).tolist() == [63, 63, 62, 62]
    assert os.stat(folders.files[0]).st_nlink == 63 + 5 + 1  # train + val links + the source
    assert build_tree(str(tmp_path), train=250, val=20, classes=4)["reused"]
