"""The DALI feeder alone: images/s one rank's host side hands DALI (draws + reads + checks + columns).

What DALI cannot start without, per batch: this rank's sample order, every file read and its
header checked (:func:`fastbyol.data.image_check.check_encoded`), both views' draws
(:func:`fastbyol.augment.draw_samples`) and the pipeline's parameter columns
(:mod:`fastbyol.data.dali_params`). No decoding: that is DALI's (nvJPEG on a GPU). Each row
runs the product's own :class:`fastbyol.data.dali.TwoViewFeeder` exactly as DALI calls it
(``start``, then one call per batch), over whole epochs; images/s counts source images.

Rows:
  page cache, 16 read threads  — the default feeder, files already in memory (fast reads stay on
                                   the preparing thread: threads would only contend for the GIL)
  page cache, 1 read thread    — the same, reads in the preparing thread itself
  1 ms per read, 16 / 1 threads — every read first sleeps 1 ms (a network file system's
                                   latency), the rest unchanged: are reads overlapped?
  floor: the reads alone       — the feeder's reader (read_encoded) on every file in a tight
                                   loop: the page-cache copy's cost here, whatever the feeder does
  draws + columns only         — no file at all (the batch's sizes given): the vectorised part
  baseline: Generator per image — ``np.random.default_rng((seed, epoch, i))`` + its 108 draws
                                   per image, the previous definition's per-image cost floor

By default the process is pinned to one CPU core (``--cores`` to change): the target is
>= 20,000 img/s from page cache on one core, and 1 ms reads overlapped (>= 8x the serial rate).

    python -m fastbyol.bench.feeder [--num-files N] [--batch B] [--epochs E] [--rounds R]
                                      [--cores C] [--smoke] [--out DIR]

``--rounds`` interleaves the rows and reports each one's median round, for shared machines.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from fastbyol.bench.common import markdown_table, stamp, write_json
from fastbyol.bench.pipeline import make_jpeg_folder

TARGET_PAGE_CACHE = 20_000  # img/s per rank on one core
TARGET_OVERLAP = 8.0  # 1 ms reads: 16 threads vs 1


def run_feeder(feeder, epochs: int) -> float:
    """Images/s of ``epochs`` whole epochs fed the way DALI calls the feeder."""
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        feeder.start(epoch, 0)
        while True:
            try:
                cols = feeder()
            except StopIteration:
                break
            feeder.consumed()
            n += len(cols[0])
    feeder.close()
    return n / (time.perf_counter() - t0)


def feeder_row(src, aug, batch: int, epochs: int, threads: int, read_delay: float) -> Callable[[], float]:
    from fastbyol.data.dali import TwoViewFeeder
    from fastbyol.data.image_source import read_encoded

    def go():
        feeder = TwoViewFeeder(src, aug, batch, seed=0, rank=0, world_size=1, read_threads=threads)
        if read_delay:
            def slow_read(source, i):
                time.sleep(read_delay)
                return read_encoded(source, i)

            feeder.read = slow_read
        return run_feeder(feeder, epochs)

    return go


def draws_row(aug, batch: int, batches: int) -> Callable[[], float]:
    from fastbyol.augment import draw_samples
    from fastbyol.data.dali_params import dali_columns, view_columns

    rng = np.random.default_rng(0)
    h, w = rng.integers(300, 500, batch), rng.integers(300, 500, batch)

    def go():
        t0 = time.perf_counter()
        for k in range(batches):
            v1, v2 = draw_samples(np.arange(k * batch, (k + 1) * batch), h, w, aug, 0, 0)
            dali_columns(v1, view_columns(aug.view1), aug.blur_kernel_size)
            dali_columns(v2, view_columns(aug.view2), aug.blur_kernel_size)
        return batches * batch / (time.perf_counter() - t0)

    return go


def raw_reads(src, epochs: int) -> Callable[[], float]:
    """The floor: every file read by the feeder's own reader (``read_encoded``) in a tight loop."""
    from fastbyol.data.image_source import read_encoded

    def go():
        t0 = time.perf_counter()
        for _ in range(epochs):
            for i in range(len(src)):
                read_encoded(src, i)
        return epochs * len(src) / (time.perf_counter() - t0)

    return go


def generator_baseline(batch: int, batches: int) -> Callable[[], float]:
    from fastbyol.augment import DRAWS_PER_VIEW

    def go():
        t0 = time.perf_counter()
        for i in range(batches * batch):
            np.random.default_rng((0, 0, i)).random(2 * DRAWS_PER_VIEW)
        return batches * batch / (time.perf_counter() - t0)

    return go


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-files", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cores", type=int, default=1, help="CPU cores to pin the process to (0: no pinning)")
    p.add_argument("--data", default=None, help="a JPEG folder to read instead of the generated one")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.num_files, args.batch, args.epochs, args.rounds = 64, 16, 1, 1
    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    torch.set_num_threads(1)

    from fastbyol.config import preset
    from fastbyol.data.sources import scan_image_folder

    aug = preset("imagenet-resnet50").augment
    folder = "fastbyol-bench-feeder-smoke" if args.smoke else "fastbyol-bench-feeder"
    root = args.data or make_jpeg_folder(os.path.join(tempfile.gettempdir(), folder),
                                         args.num_files, size=(500, 375) if not args.smoke else (64, 48))
    src = scan_image_folder(root)
    print(f"{len(src)} files in {root}; batch {args.batch}; pinned to {args.cores or 'all'} core(s)", flush=True)
    run_feeder_warm = feeder_row(src, aug, args.batch, 1, 16, 0.0)
    run_feeder_warm()  # page cache warm
    slow_epochs_files = min(len(src), 4 * args.batch)
    slow_src = src.subset(np.arange(slow_epochs_files)) if slow_epochs_files < len(src) else src
    batches = max(1, len(src) // args.batch)
    rows_spec = {
        "page cache, 16 read threads": feeder_row(src, aug, args.batch, args.epochs, 16, 0.0),
        "page cache, 1 read thread": feeder_row(src, aug, args.batch, args.epochs, 1, 0.0),
        "1 ms per read, 16 read threads": feeder_row(slow_src, aug, args.batch, 1, 16, 1e-3),
        "1 ms per read, 1 read thread": feeder_row(slow_src, aug, args.batch, 1, 1, 1e-3),
        "floor: the reads alone (read_encoded, 1 thread)": raw_reads(src, args.epochs),
        "draws + columns only (no files)": draws_row(aug, args.batch, batches * args.epochs),
        "baseline: a numpy Generator per image (draws only)": generator_baseline(args.batch, batches),
    }
    results: Dict[str, List[float]] = {k: [] for k in rows_spec}
    for r in range(args.rounds):
        for name, fn in rows_spec.items():
            results[name].append(fn())
            print(f"round {r + 1}/{args.rounds}  {name}: {results[name][-1]:,.0f} img/s", flush=True)
    rows = [{"feeder": k, "img_per_s": statistics.median(v), "rounds": [round(x) for x in v]}
            for k, v in results.items()]
    med = {r["feeder"]: r["img_per_s"] for r in rows}
    overlap = med["1 ms per read, 16 read threads"] / med["1 ms per read, 1 read thread"]
    floor = med["floor: the reads alone (read_encoded, 1 thread)"]
    verdict = {
        "feeder_overhead_us_per_image_beyond_reads": 1e6 * (1 / med["page cache, 16 read threads"] - 1 / floor),
        "page_cache_img_per_s": med["page cache, 16 read threads"],
        "page_cache_target": TARGET_PAGE_CACHE,
        "page_cache_meets_target": med["page cache, 16 read threads"] >= TARGET_PAGE_CACHE,
        "slow_read_overlap_x": overlap, "overlap_target_x": TARGET_OVERLAP,
        "overlap_meets_target": overlap >= TARGET_OVERLAP,
    }
    print(markdown_table(rows, ["feeder", "img_per_s", "rounds"]))
    print(verdict)
    dev = torch.device("cpu")
    result = {**stamp(dev), "pinned_cores": args.cores, "files": len(src), "batch": args.batch,
              "image_size": "500x375 JPEG q90" if not (args.smoke or args.data) else root,
              "rows": rows, "verdict": verdict}
    name = "feeder_cpu_smoke.json" if args.smoke else "feeder_cpu.json"
    path = write_json(result, name, args.out)
    try:
        plot(rows, path.replace(".json", ".png"), args)
    except ImportError:
        pass
    print(f"wrote {path}")
    return result


def plot(rows, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [r["feeder"] for r in rows][::-1]
    vals = [r["img_per_s"] for r in rows][::-1]
    ax.barh(names, vals, color="tab:blue")
    ax.axvline(TARGET_PAGE_CACHE, color="tab:red", ls="--", label=f"target {TARGET_PAGE_CACHE:,} img/s")
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s, one rank, {args.cores or 'all'} core(s), batch {args.batch}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
