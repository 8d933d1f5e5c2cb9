"""Small data the tests generate: JPEG class folders, CIFAR-style pickle batches, bad files."""
import os
import pickle

import numpy as np
from PIL import Image


def textured(rng, h, w):
    """An image whose colour varies within it (no per-image colour shortcut)."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, size=(h, w, 3))
    stripes = (np.sin(x * rng.uniform(0.3, 1.5) + y * rng.uniform(0, 1)) > 0)[..., None] * 80
    return np.clip(base // 2 + stripes, 0, 255).astype(np.uint8)


def smoke_args(data, out, *extra):
    """``fastbyol train`` arguments of a seconds-long run on ``data``: the smoke preset, the
    reference kernels, no kNN."""
    return ["train", "--preset", "smoke", "--data", data, "--out", str(out), "--train.kernels", "torch",
            "--train.knn_every", "0", *extra]


def make_image_folder(root, classes=3, per_class=8, size=(40, 48), seed=0, ext="jpg"):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(textured(rng, *size)).save(os.path.join(d, f"{i:03d}.{ext}"), quality=90)
    return str(root)


def make_cifar_dir(root, n_per_batch=20, batches=2, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for b in range(1, batches + 1):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        with open(os.path.join(root, f"data_batch_{b}"), "wb") as fh:
            pickle.dump({"data": data, "labels": list(rng.integers(0, classes, n_per_batch))}, fh)
    with open(os.path.join(root, "test_batch"), "wb") as fh:
        pickle.dump({"data": rng.integers(0, 256, size=(10, 3072), dtype=np.uint8),
                     "labels": list(rng.integers(0, classes, 10))}, fh)
    with open(os.path.join(root, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(classes)]}, fh)
    return str(root)


def add_bad_files(folder):
    """A corrupt file and a truncated JPEG, as found in real crawls."""
    with open(os.path.join(folder, "corrupt.jpg"), "wb") as fh:
        fh.write(b"this is not a jpeg")
    good = sorted(f for f in os.listdir(folder) if f.endswith(".jpg") and f != "corrupt.jpg")[0]
    data = open(os.path.join(folder, good), "rb").read()
    with open(os.path.join(folder, "truncated.jpg"), "wb") as fh:
        fh.write(data[: len(data) // 3])
    return ["corrupt.jpg", "truncated.jpg"]


def make_tar_shards(root, folder, shards=2, labels=True, extra=None):
    """Pack an image folder (``make_image_folder``'s layout) into webdataset shards
    ``root/shard-000.tar``…: per sample ``<key>.<ext>`` and, with ``labels``, ``<key>.cls``
    holding the class number. ``extra``: ``{member name: bytes}`` appended to the last shard.
    Returns ``(root, [(class, image bytes)] in shard order)``."""
    import io
    import tarfile

    classes = sorted(os.listdir(folder))
    samples = [(c, os.path.join(folder, cls, n)) for c, cls in enumerate(classes)
               for n in sorted(os.listdir(os.path.join(folder, cls)))]
    os.makedirs(root, exist_ok=True)
    written = []

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(shards):
        with tarfile.open(os.path.join(root, f"shard-{s:03d}.tar"), "w") as tar:
            for k in range(s, len(samples), shards):
                c, path = samples[k]
                data = open(path, "rb").read()
                key = f"sample{k:05d}"
                add(tar, f"{key}.{path.rsplit('.', 1)[1]}", data)
                if labels:
                    add(tar, f"{key}.cls", str(c).encode())
                written.append((c, data))
            if s == shards - 1:
                for name, data in (extra or {}).items():
                    add(tar, name, data)
    return str(root), written
