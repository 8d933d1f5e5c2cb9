"""A simulated ImageNet tree for the scale benchmark: class folders of hard links and tar shards.

Every training file of class ``c`` is a hard link to one small JPEG of that class (one source
file per class keeps each inode's link count far below ext4's 65,000), so 1.28 M files cost
inodes and directory entries, not gigabytes. The tar shards hold the same JPEG bytes with a
``.cls`` member per sample, as webdataset's ImageNet shards do.
"""
from __future__ import annotations

import io
import os
import tarfile
import time
from typing import Dict

import numpy as np


def _jpeg(seed: int, size: int = 24) -> bytes:
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def class_name(c: int) -> str:
    return f"n{c:08d}"


def per_class(n: int, classes: int) -> np.ndarray:
    """How many of ``n`` samples fall in each class (as even as possible)."""
    return np.full(classes, n // classes) + (np.arange(classes) < n % classes)


def build_tree(root: str, train: int = 1_281_167, val: int = 50_000, classes: int = 1000) -> Dict:
    """``root/train/<class>/<class>_<i>.JPEG`` and ``root/val/<class>/...`` as hard links to
    ``root/src/<class>.JPEG``; kept when it already holds as many files. Returns timings."""
    t0 = time.perf_counter()
    stamp = os.path.join(root, f".built-{train}-{val}-{classes}")
    if os.path.exists(stamp):
        return {"tree_build_s": 0.0, "reused": True}
    os.makedirs(os.path.join(root, "src"), exist_ok=True)
    for c in range(classes):
        path = os.path.join(root, "src", class_name(c) + ".JPEG")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(_jpeg(c))
    for split, n in (("train", train), ("val", val)):
        for c, count in enumerate(per_class(n, classes)):
            folder = os.path.join(root, split, class_name(c))
            os.makedirs(folder, exist_ok=True)
            src = os.path.join(root, "src", class_name(c) + ".JPEG")
            have = set(os.listdir(folder))
            for i in range(count):
                name = f"{class_name(c)}_{i}.JPEG"
                if name not in have:
                    os.link(src, os.path.join(folder, name))
    open(stamp, "w").close()
    return {"tree_build_s": time.perf_counter() - t0, "reused": False}


def build_shards(root: str, train: int = 1_281_167, classes: int = 1000, per_shard: int = 1000) -> Dict:
    """``root/shards/train-NNNNNN.tar``: ``train`` samples (``<key>.jpg`` + ``<key>.cls``),
    ``per_shard`` to a shard, classes interleaved. Kept when already written."""
    t0 = time.perf_counter()
    folder = os.path.join(root, "shards")
    stamp = os.path.join(folder, f".built-{train}-{classes}-{per_shard}")
    if os.path.exists(stamp):
        return {"shard_build_s": 0.0, "reused": True}
    os.makedirs(folder, exist_ok=True)
    jpegs = [_jpeg(c) for c in range(classes)]
    labels = np.arange(train) % classes
    for s, start in enumerate(range(0, train, per_shard)):
        with tarfile.open(os.path.join(folder, f"train-{s:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, train)):
                c = int(labels[i])
                for ext, data in ((".jpg", jpegs[c]), (".cls", str(c).encode())):
                    info = tarfile.TarInfo(f"{class_name(c)}_{i:07d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    open(stamp, "w").close()
    return {"shard_build_s": time.perf_counter() - t0, "reused": False}


if __name__ == "__main__":
    import sys

    r = sys.argv[1]
    print(build_tree(r), flush=True)
    print(build_shards(r), flush=True)
