"""The images a training benchmark reads: generated JPEG folders and CIFAR batches (cached on
disk, so the trainer reads them exactly as a user's data), loaders for the peers, pre-made views."""
from __future__ import annotations

import json
import os
import pickle
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from fastbyol.data.image_source import ImageSource
from fastbyol.data.sources import load_source, scan_image_folder

from .configs import BenchConfig, Context


def cache_root(cache: Optional[str]) -> str:
    return cache or os.path.join(os.environ.get("FASTBYOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastbyol"), "bench")


def photo_like(seed: int, width: int, height: int) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` image with structure at several scales (so JPEG sizes and
    decode times are ImageNet-like, ~80-100 KB at 500×375, q90), not flat colour or white noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((4, 110.0), (16, 50.0), (64, 30.0), (200, 24.0)):
        cw = max(2, min(cells, width // 2))
        ch = max(2, cw * height // width)
        small = rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
        img += amp * (up / 127.5 - 1.0)
    img += rng.normal(0, 10, img.shape) + rng.uniform(98, 158, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_jpeg(args) -> None:
    from PIL import Image

    path, seed, width, height, quality = args
    tmp = path + ".tmp"
    Image.fromarray(photo_like(seed, width, height)).save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)


def ensure_jpeg_folder(n: int, size=(500, 375), quality: int = 90, cache: Optional[str] = None,
                       classes: int = 10) -> str:
    """An ImageNet-like folder of at least ``n`` JPEGs (``root/classK/NNNNNN.jpg``), written
    once (in parallel) and grown when a later run needs more."""
    root = os.path.join(cache_root(cache), f"jpeg-{size[0]}x{size[1]}-q{quality}-v1")
    marker = os.path.join(root, "done.json")
    have = 0
    if os.path.isfile(marker):
        with open(marker) as fh:
            have = json.load(fh).get("images", 0)
    if have >= n:
        return root
    jobs = []
    for i in range(have, n):
        d = os.path.join(root, f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        jobs.append((os.path.join(d, f"{i:07d}.jpg"), i, size[0], size[1], quality))
    t0 = time.perf_counter()
    procs = min(len(jobs), os.cpu_count() or 1)
    if procs > 1 and len(jobs) > 64:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(procs) as pool:
            pool.map(_write_jpeg, jobs, chunksize=32)
    else:
        for j in jobs:
            _write_jpeg(j)
    with open(marker + ".tmp", "w") as fh:
        json.dump({"images": n, "size": list(size), "quality": quality}, fh)
    os.replace(marker + ".tmp", marker)
    print(f"wrote {len(jobs)} JPEGs ({size[0]}x{size[1]}, q{quality}) to {root} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return root


def cifar_like_array(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` CIFAR-like uint8 images ``[n, size, size, 3]`` in memory (smooth multi-scale
    colour structure plus noise), generated in one vectorised pass."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 3, size, size)
    for cells, amp in ((2, 0.45), (4, 0.25), (8, 0.15)):
        low = torch.rand(n, 3, cells, cells, generator=g) * 2 - 1
        img += amp * torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img += 0.04 * torch.randn(n, 3, size, size, generator=g) + 0.5
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def ensure_cifar_dir(n: int, cache: Optional[str] = None, seed: int = 0) -> str:
    """A CIFAR-10-format batch folder (``data_batch_1``, a small ``test_batch``, ``batches.meta``)
    of ``n`` generated CIFAR-like images, written once: the trainer reads it as a user's CIFAR."""
    root = os.path.join(cache_root(cache), f"cifar-like-{n}-s{seed}-v1")
    if os.path.isfile(os.path.join(root, "batches.meta")):
        return root
    os.makedirs(root, exist_ok=True)
    for name, count, s in (("data_batch_1", n, seed), ("test_batch", min(n, 256), seed + 1)):
        arr = cifar_like_array(count, 32, s)
        batch = {"data": arr.transpose(0, 3, 1, 2).reshape(count, -1), "labels": [i % 10 for i in range(count)]}
        with open(os.path.join(root, name + ".tmp"), "wb") as fh:
            pickle.dump(batch, fh)
        os.replace(os.path.join(root, name + ".tmp"), os.path.join(root, name))
    with open(os.path.join(root, "batches.meta"), "wb") as fh:  # written last: marks the folder complete
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    return root


def build_source(cfg: BenchConfig, n: int, data: Optional[str], cache: Optional[str]) -> ImageSource:
    """The images of a run, from disk: ``data``, or generated CIFAR batches / JPEGs (cached).
    Its ``root`` is what the trainer is pointed at."""
    if data is not None:
        return load_source(data)
    if cfg.source == "array":
        return load_source(ensure_cifar_dir(n, cache))
    return scan_image_folder(ensure_jpeg_folder(n, cfg.jpeg_size, cache=cache))


def forever(make_epoch: Callable[[int], Iterator]) -> Iterator:
    """Batches across epochs; an epoch that yields nothing is an error, not a hang."""
    epoch = 0
    while True:
        got = False
        for b in make_epoch(epoch):
            got = True
            yield b
        if not got:
            raise RuntimeError("an epoch produced no batch: the data set is smaller than the batch")
        epoch += 1


class PILDataset(torch.utils.data.Dataset):
    """(transform(RGB PIL image), 0) per sample: the shape of torchvision's CIFAR10 / ImageFolder,
    which the peers' loops expect. Decodes exactly as fastbyol's torch loader does."""

    def __init__(self, source: ImageSource, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from fastbyol.data.torch_loader import open_rgb

        return self.transform(open_rgb(self.source, i)), 0


def peer_loader(ctx: Context, transform) -> torch.utils.data.DataLoader:
    # As lightly's example: shuffle, drop_last, no pinning; workers as every mode here.
    return torch.utils.data.DataLoader(PILDataset(ctx.source, transform), batch_size=ctx.batch, shuffle=True,
                                       drop_last=True, num_workers=ctx.workers)


def synthetic_views(ctx: Context, channels_last: bool = True):
    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    s = ctx.cfg.image_size
    views = []
    for _ in range(2):
        v = torch.randn(ctx.batch, 3, s, s, generator=g).to(ctx.device)
        views.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
    return views
