"""ImageNet-scale data start-up: index time and memory, worker memory per epoch, launch to first
batch, shard index times, on a simulated ImageNet tree of hard links (:mod:`.scale_tree`).

    python benchmarks/bench_scale.py                      # 1,281,167 + 50,000 files, 1,000 classes
    python benchmarks/bench_scale.py --train 20000 --classes 100 --per-shard 500   # minutes less

Every measurement runs in a fresh process (spawned), so resident memory is its own:

* **index**: ``scan_image_folder`` without the cache (a full listing), then with it (the cache
  written by the first), with the resident-memory growth each costs, against the same paths as
  a Python list of strings (the old index);
* **hold-out split**: ``split_holdout`` (2 % of the training set, as ``--data.val_fraction``);
* **workers**: DataLoader workers (persistent, forked) that look up every path of their share
  once per epoch: growth of each worker's private memory per epoch, numpy index vs list;
* **launch**: process start to the first training batch (``resolve_sources`` + the torch
  loader, 2 workers, 32 px), with the index cache warm and cold;
* **shards**: ``scan_webdataset`` over the tar shards by ``--ranks`` processes at once on an
  empty cache (one builds under the lock, the others wait), then warm; resident growth.

Results: ``benchmarks/results/scale_cpu_<train>.json``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import time
from typing import Dict, List

import numpy as np


def rss_mib(pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


def private_mib(pid: int) -> float:
    """Private (copied or written) pages of a process: what copy-on-write costs a worker."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(l.split()[1]) for l in f if l.startswith(("Private_Clean", "Private_Dirty"))) / 1024


def _child(fn, args, q) -> None:
    try:
        q.put(fn(*args))
    except BaseException as e:  # reported by the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def _results(q, procs) -> List[Dict]:
    """One result per process; a clear error when a process dies without one."""
    import queue

    out: List[Dict] = []
    while len(out) < len(procs):
        try:
            out.append(q.get(timeout=5))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise RuntimeError(f"{len(procs) - len(out)} measuring process(es) died without a result")
    return out


def in_fresh_process(fn, *args) -> Dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = _results(q, [p])[0]
    p.join()
    if "error" in out:
        raise RuntimeError(f"{fn.__name__}: {out['error']}")
    return out


def measure_index(root: str, cache: str) -> Dict:
    os.environ["FASTBYOL_CACHE"] = cache
    from fastbyol.data.sources import scan_image_folder, split_holdout

    base = rss_mib()
    t0 = time.perf_counter()
    src = scan_image_folder(root, cache=False)
    scan_s = time.perf_counter() - t0
    scanned_mib = rss_mib() - base
    n = len(src)
    t0 = time.perf_counter()
    split_holdout(src, 0.02, 0)
    split_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    as_list = list(src.files)
    list_s = time.perf_counter() - t0
    list_mib = rss_mib() - base - scanned_mib
    del as_list
    return {"files": n, "classes": len(src.classes), "scan_nocache_s": scan_s,
            "index_nbytes_mib": (src.files.nbytes + src.labels.nbytes) / 2 ** 20,
            "index_rss_growth_mib": scanned_mib, "python_list_rss_mib": list_mib, "python_list_build_s": list_s,
            "holdout_split_s": split_s}


def measure_cached_index(root: str, cache: str) -> Dict:
    os.environ["FASTBYOL_CACHE"] = cache
    from fastbyol.data.sources import scan_image_folder

    base = rss_mib()
    t0 = time.perf_counter()
    src = scan_image_folder(root)
    return {"files": len(src), "scan_s": time.perf_counter() - t0, "index_rss_growth_mib": rss_mib() - base}


class _TouchPaths:
    """Item: a list of sample indices → how many path characters were looked up (a worker
    touching the paths as a loader does, without reading the images)."""

    def __init__(self, files):
        self.files = files

    def __getitem__(self, idx):
        return sum(len(self.files[i]) for i in idx)


def measure_workers(root: str, cache: str, kind: str, epochs: int = 3, workers: int = 2) -> Dict:
    os.environ["FASTBYOL_CACHE"] = cache
    import torch
    from torch.utils.data import DataLoader

    from fastbyol.data.sources import scan_image_folder

    src = scan_image_folder(root)
    files = list(src.files) if kind == "list" else src.files
    n = len(files)
    batches = [list(range(i, min(i + 4096, n))) for i in range(0, n, 4096)]
    loader = DataLoader(_TouchPaths(files), batch_size=None, sampler=batches, num_workers=workers,
                        persistent_workers=True, prefetch_factor=2)
    per_epoch: List[float] = []
    it = iter(loader)
    next(it)
    pids = [w.pid for w in loader._iterator._workers]
    start = sum(private_mib(p) for p in pids) / workers
    for _ in it:
        pass
    for e in range(epochs):
        if e:
            for _ in loader:
                pass
        per_epoch.append(sum(private_mib(p) for p in pids) / workers)
    del torch
    return {"kind": kind, "workers": workers, "worker_private_mib_first_batch": start,
            "worker_private_mib_after_epoch": per_epoch,
            "growth_first_epoch_mib": per_epoch[0] - start,
            "growth_later_epochs_mib": (per_epoch[-1] - per_epoch[0]) / max(1, epochs - 1)}


def measure_launch(t_start: float, root: str, cache: str) -> Dict:
    os.environ["FASTBYOL_CACHE"] = cache
    import torch

    from fastbyol.config import apply_overrides, preset
    from fastbyol.data import resolve_sources
    from fastbyol.data.torch_loader import TorchTwoViewLoader

    cfg = apply_overrides(preset("smoke"), {"data.data": root, "augment.image_size": 32})
    t0 = time.time()
    imports_s = t0 - t_start  # the interpreter, torch and fastbyol: what any run pays
    train, val = resolve_sources(cfg)
    sources_s = time.time() - t0
    loader = TorchTwoViewLoader(train, cfg.augment, 64, torch.device("cpu"), workers=2)
    next(iter(loader))
    return {"launch_to_first_batch_s": time.time() - t_start, "imports_s": imports_s, "sources_s": sources_s,
            "train": len(train), "holdout": len(val)}


def measure_shards(spec: str, cache: str, t_go: float) -> Dict:
    os.environ["FASTBYOL_CACHE"] = cache
    from fastbyol.data import webdataset

    reads = []
    real = webdataset._read_tar_index
    webdataset._read_tar_index = lambda p: reads.append(p) or real(p)
    time.sleep(max(0.0, t_go - time.time()))  # every rank starts together
    base = rss_mib()
    t0 = time.perf_counter()
    src = webdataset.scan_webdataset(spec)
    return {"samples": len(src), "shards": len(src.tar.shards), "seconds": time.perf_counter() - t0,
            "shards_read_here": len(reads), "rss_growth_mib": rss_mib() - base}


def run_launch(root: str, cache: str) -> Dict:
    """Process start (before any import) to first batch: a fresh interpreter, timed from its start."""
    import subprocess

    code = ("import time; t=time.time(); import sys; from fastbyol.bench.scale import measure_launch; "
            "import json; print(json.dumps(measure_launch(t, sys.argv[1], sys.argv[2])))")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code, root, cache], capture_output=True, text=True, check=True)
    res = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.time() - t0
    return res


def run_shards(spec: str, cache: str, ranks: int) -> List[Dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    go = time.time() + 3.0
    procs = [ctx.Process(target=_child, args=(measure_shards, (spec, cache, go), q)) for _ in range(ranks)]
    for p in procs:
        p.start()
    out = _results(q, procs)
    for p in procs:
        p.join()
    return out


def summary_rows(res: Dict) -> List[Dict]:
    """The printed table (also saved as ``rows``)."""
    ix, w = res["index"], {r["kind"]: r for r in res["workers"]}
    first, warm = res["shards_first_run"], res["shards_warm"]
    return [
        {"what": f"folder index, no cache (list {ix['files']:,} files)", "value": f"{ix['scan_nocache_s']:.1f} s"},
        {"what": "folder index, cache cold (list + write)", "value": f"{res['index_cold_cache']['scan_s']:.1f} s"},
        {"what": "folder index, cache warm", "value": f"{res['index_warm_cache']['scan_s']:.2f} s"},
        {"what": "index memory (numpy arrays, RSS growth)", "value": f"{res['index_warm_cache']['index_rss_growth_mib']:.0f} MiB"},
        {"what": "same paths as a Python list of str", "value": f"{ix['python_list_rss_mib']:.0f} MiB"},
        {"what": "hold-out split (2 %)", "value": f"{ix['holdout_split_s']:.2f} s"},
        {"what": "DataLoader worker private memory, numpy index", "value":
            f"{w['numpy']['worker_private_mib_after_epoch'][-1]:.0f} MiB "
            f"(+{w['numpy']['growth_later_epochs_mib']:.1f} MiB/epoch, persistent)"},
        {"what": "DataLoader worker private memory, list of str", "value":
            f"{w['list']['worker_private_mib_after_epoch'][-1]:.0f} MiB "
            f"(+{w['list']['growth_later_epochs_mib']:.1f} MiB/epoch, persistent)"},
        *({"what": f"launch to first batch, cache {c}", "value":
           f"{r['launch_to_first_batch_s']:.1f} s (imports {r.get('imports_s', float('nan')):.1f} s, "
           f"sources {r['sources_s']:.1f} s)"}
          for c, r in (("warm", res["launch_warm_cache"]), ("cold", res["launch_cold_cache"]))),
        {"what": f"shard index, first run, {len(first)} ranks at once", "value":
            f"{max(r['seconds'] for r in first):.1f} s; shards read per rank {sorted(r['shards_read_here'] for r in first)}"},
        {"what": "shard index, warm", "value": f"{max(r['seconds'] for r in warm):.2f} s"},
        {"what": "shard index memory per rank (RSS growth)", "value": f"{max(r['rss_growth_mib'] for r in warm):.0f} MiB"},
    ]


def main(argv=None) -> Dict:
    from .common import RESULTS, markdown_table, stamp, write_json
    from .scale_tree import build_shards, build_tree

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join("/tmp", "fastbyol-scale-tree"), help="where the tree goes (kept)")
    ap.add_argument("--train", type=int, default=1_281_167)
    ap.add_argument("--val", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard (ImageNet's usual 1,000)")
    ap.add_argument("--ranks", type=int, default=4, help="processes indexing the shards at once (one node)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    built = {**build_tree(args.root, args.train, args.val, args.classes),
             **build_shards(args.root, args.train, args.classes, args.per_shard)}
    train_root = os.path.join(args.root, "train")
    cache = os.path.join(args.root, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    res: Dict = {"config": vars(args), "build": built}
    res["index"] = in_fresh_process(measure_index, train_root, cache)
    res["index_cold_cache"] = in_fresh_process(measure_cached_index, train_root, cache)  # writes the cache
    res["index_warm_cache"] = in_fresh_process(measure_cached_index, train_root, cache)
    res["workers"] = [in_fresh_process(measure_workers, train_root, cache, kind) for kind in ("numpy", "list")]
    res["launch_warm_cache"] = run_launch(train_root, cache)
    shutil.rmtree(cache, ignore_errors=True)
    res["launch_cold_cache"] = run_launch(train_root, cache)
    shard_dir = os.path.join(args.root, "shards")
    res["shards_first_run"] = run_shards(shard_dir, cache, args.ranks)
    res["shards_warm"] = run_shards(shard_dir, cache, args.ranks)

    rows = summary_rows(res)
    print(markdown_table(rows, ["what", "value"]))
    res.update(stamp(torch.device("cpu")), rows=rows)
    path = write_json(res, f"scale_cpu_{args.train}.json", args.out)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
