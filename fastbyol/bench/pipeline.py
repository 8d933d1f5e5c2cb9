"""Input pipelines: images/s delivering BYOL's two augmented views, DALI vs torchvision.

Each row produces, per source image, both BYOL views (crop, flip, colour jitter, grayscale,
blur, solarise, normalise; the paper's probabilities from ``AugmentConfig``) as float tensors
on the training device; images/s counts source images (two views each).

  dali-gpu     — fastbyol.data.dali.DaliTwoViewLoader on CUDA (nvJPEG / HW decoder)   [CUDA only]
  dali-cpu     — the same pipeline on DALI's CPU backend, ``--workers`` threads
  torchvision  — DataLoader, ``--workers`` processes, PIL transforms per view:
                 RandomResizedCrop(bicubic) + flip + ColorJitter + Grayscale + GaussianBlur +
                 Solarize + ToTensor + Normalize (the common BYOL recipe, e.g. lightly's)
  fastbyol-torch — fastbyol.data.torch_loader.TorchTwoViewLoader (workers crop; the photometry
                 runs batched on the device, or in the workers when the device is the CPU)

Two data sets: a generated ImageNet-like JPEG folder (~500×375, quality 90; ``--data`` for a
real one) at 224 px, and an in-memory CIFAR-like uint8 array at 32 px (the CIFAR preset: no
blur). Prints a markdown table and writes JSON (device, versions, date) to ``--out``.

    python -m fastbyol.bench.pipeline [--num-files N] [--data DIR] [--batch B] [--workers W]
                                        [--batches K] [--rounds R] [--cpu] [--smoke] [--out DIR]

``--rounds`` interleaves the rows and keeps each one's best round, for machines shared with
other jobs.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from fastbyol.bench.common import markdown_table, stamp, write_json


# ----------------------------------------------------------------------------- data

def make_jpeg_folder(root: str, n: int, size=(500, 375), classes: int = 10, seed: int = 0) -> str:
    """``n`` JPEGs (quality 90) with ImageNet-like statistics: smooth shapes plus grain, so
    they compress to a realistic size (~100 KB at 500×375). Reused when already there."""
    from PIL import Image

    marker = os.path.join(root, f".complete-{n}")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        d = os.path.join(root, f"class{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        img = np.asarray(low, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(marker, "w").close()
    return root


# ----------------------------------------------------------------------------- torchvision baseline

def torchvision_view(view, aug):
    """One view as a torchvision PIL transform chain (ops with probability 0 left out)."""
    import torchvision.transforms as T

    ops = [T.RandomResizedCrop(aug.image_size, scale=aug.crop_scale, ratio=aug.crop_ratio,
                               interpolation=T.InterpolationMode.BICUBIC)]
    if view.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(view.flip_p))
    if view.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                                 p=view.jitter_p))
    if view.grayscale_p > 0:
        ops.append(T.RandomGrayscale(view.grayscale_p))
    if view.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(aug.blur_kernel_size, aug.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=view.solarize_p))
    ops += [T.ToTensor(), T.Normalize(aug.mean, aug.std)]
    return T.Compose(ops)


class TorchvisionTwoViews(torch.utils.data.Dataset):
    def __init__(self, source, aug):
        self.source = source
        self.t1, self.t2 = torchvision_view(aug.view1, aug), torchvision_view(aug.view2, aug)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        from PIL import Image

        if self.source.array is not None:
            img = Image.fromarray(self.source.array[i])
        else:
            with Image.open(self.source.files[i]) as f:
                img = f.convert("RGB")
        return self.t1(img), self.t2(img), int(self.source.labels[i])


def torchvision_batches(source, aug, batch, workers, device):
    loader = torch.utils.data.DataLoader(
        TorchvisionTwoViews(source, aug), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None)
    for v1, v2, y in loader:
        yield v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- timing

def images_per_second(make_iter: Callable[[], object], batch: int, batches: int, warmup: int,
                      device: torch.device) -> Dict:
    """Throughput of one fresh pass: ``warmup`` batches (start-up, worker spawn) untimed, then
    ``batches`` timed; the views are touched so lazy work is counted."""
    it = iter(make_iter())
    t_start = time.perf_counter()
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        out = next(it)
        v1 = out.view1 if hasattr(out, "view1") else out[0]
        n += v1.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    del it
    return {"images_per_s": n / dt, "timed_images": n, "time_s": dt, "startup_s": t0 - t_start}


def run_case(name: str, source, aug, args, devices: List[torch.device]) -> List[Dict]:
    from fastbyol.data import dali_available

    rows = []
    steps = len(source) // args.batch
    batches = min(args.batches, steps - args.warmup)
    if batches < 1:
        raise SystemExit(f"{name}: {len(source)} images give {steps} batches of {args.batch}; need more than "
                         f"--warmup {args.warmup} (use more files or a smaller --batch)")
    methods = []
    if dali_available():
        from fastbyol.data.dali import DaliTwoViewLoader

        for dev in devices:
            tag = "dali-gpu" if dev.type == "cuda" else "dali-cpu"
            methods.append((tag, dev, lambda dev=dev: DaliTwoViewLoader(source, aug, args.batch, dev,
                                                                          workers=args.workers)))
    else:
        print("DALI is not installed: dali rows skipped")
    train_dev = devices[0]
    methods.append(("torchvision", train_dev, lambda: torchvision_batches(source, aug, args.batch, args.workers,
                                                                         train_dev)))
    try:
        from fastbyol.data.torch_loader import TorchTwoViewLoader
    except ImportError:
        TorchTwoViewLoader = None
    if TorchTwoViewLoader is not None:
        methods.append(("fastbyol-torch", train_dev, lambda: TorchTwoViewLoader(source, aug, args.batch, train_dev,
                                                                                 workers=args.workers)))
    runs: Dict[str, List[Dict]] = {m[0]: [] for m in methods}
    for _ in range(args.rounds):  # rows interleaved, so a busy neighbour slows all of them alike
        for method, dev, make in methods:
            threads = torch.get_num_threads()
            if args.smoke:
                torch.set_num_threads(1)  # robust on a busy CI box: spinning OpenMP threads stall
            try:
                r = images_per_second(make, args.batch, batches, args.warmup, dev)
                r["torch_threads"] = torch.get_num_threads()
            finally:
                torch.set_num_threads(threads)
            gc.collect()  # drop finished pipelines and worker pools before the next row
            runs[method].append(r)
    for method, dev, _ in methods:
        rs = runs[method]
        best = max(rs, key=lambda r: r["images_per_s"])
        row = {"case": name, "method": method, "device": str(dev), "image_size": aug.image_size,
               "batch": args.batch, "workers": args.workers, **best,
               "images_per_s_rounds": [round(r["images_per_s"], 1) for r in rs]}
        print(f"  {name:14s} {method:15s} {best['images_per_s']:9.1f} img/s  (rounds: "
              f"{', '.join(f'{r:.1f}' for r in row['images_per_s_rounds'])})")
        rows.append(row)
    base = next((r["images_per_s"] for r in rows if r["method"] == "torchvision"), None)
    for r in rows:
        r["vs_torchvision"] = r["images_per_s"] / base if base else None
    return rows


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="ImageNet-style folder to read instead of generated JPEGs")
    ap.add_argument("--num-files", type=int, default=4096, help="generated JPEGs (default 4096)")
    ap.add_argument("--cache", default=None, help="where generated JPEGs are kept (default: the temp dir)")
    ap.add_argument("--cifar-images", type=int, default=16384, help="in-memory 32 px images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="DataLoader processes / DALI threads")
    ap.add_argument("--batches", type=int, default=30, help="timed batches per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every row, interleaved; the best round is reported (shared machines)")
    ap.add_argument("--cpu", action="store_true", help="CPU rows only, even with CUDA")
    ap.add_argument("--skip", default="", help="comma list of cases to skip: imagenet,cifar")
    ap.add_argument("--smoke", action="store_true", help="seconds on a CPU: 64 small files, a few batches")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    from fastbyol.config import AugmentConfig, preset
    from fastbyol.data.image_source import ImageSource
    from fastbyol.data.sources import scan_image_folder

    size = 224
    if args.smoke:
        args.num_files, args.cifar_images, args.batch, args.workers = 64, 256, 8, 0
        args.batches, args.warmup, args.rounds, args.cpu, size = 3, 1, 1, True, 64
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu:
        devices = [torch.device("cuda"), torch.device("cpu")]
    skip = {s for s in args.skip.split(",") if s}

    rows = []
    if "imagenet" not in skip:
        if args.data:
            folder = args.data
        else:
            jpeg_size = (128, 96) if args.smoke else (500, 375)
            cache = args.cache or os.path.join(tempfile.gettempdir(),
                                               f"fastbyol-bench-jpegs-{jpeg_size[0]}x{jpeg_size[1]}")
            folder = make_jpeg_folder(cache, args.num_files, size=jpeg_size)
        src = scan_image_folder(folder)
        if len(src) > args.num_files and not args.data:
            src = src.subset(np.arange(args.num_files))
        rows += run_case(f"jpeg-{size}px", src, AugmentConfig(image_size=size), args, devices)
    if "cifar" not in skip:
        rng = np.random.default_rng(0)
        arr = rng.integers(0, 256, (args.cifar_images, 32, 32, 3), dtype=np.uint8)
        src = ImageSource(labels=np.zeros(len(arr), np.int64), classes=["0"], array=arr)
        rows += run_case("cifar-32px", src, preset("cifar10-resnet18").augment, args, devices)

    info = stamp(devices[0])
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    import torchvision

    info["torchvision"] = torchvision.__version__
    info["cpu_count"] = os.cpu_count()
    result = {**info, "config": vars(args), "rows": rows}
    cols = ["case", "method", "device", "workers", "batch", "images_per_s", "vs_torchvision"]
    print(f"\n{info['device']}, torch {info['torch']}, DALI {info['dali']}, {info['date']}\n")
    print(markdown_table(rows, cols))
    tag = "gpu" if devices[0].type == "cuda" else "cpu"
    path = write_json(result, f"pipeline_{'smoke' if args.smoke else tag}.json", args.out)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
