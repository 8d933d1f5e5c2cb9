"""Where images come from: ImageNet-style class folders, CIFAR python-pickle batches, and
webdataset tar shards (:mod:`~fastbyol.data.webdataset`); :func:`load_source` picks by path.

Each is turned into an :class:`~fastbyol.data.image_source.ImageSource`.
"""
from __future__ import annotations

import os
import pickle
from typing import Tuple

import numpy as np

from ..errors import FastByolError
from .image_source import IMAGE_EXTENSIONS, ImageSource
from .webdataset import is_webdataset, scan_webdataset


def scan_image_folder(root: str) -> ImageSource:
    """Index an ImageNet-style folder: ``root/<class>/<image>``.

    Images directly in ``root`` (no class folders) are accepted as one unlabelled class.
    Files are sorted, so the index is the same on every rank.

    Raises:
        FastByolError: the folder is missing, or holds no image files.
    """
    if not os.path.exists(root):
        raise FastByolError(f"data folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise FastByolError(f"data path {root!r} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, names in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames.sort()
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, name))
                    labels.append(label)
    if not files:  # flat folder of images: one class
        flat = sorted(n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTENSIONS))
        if flat:
            classes = ["."]
            files = [os.path.join(root, n) for n in flat]
            labels = [0] * len(files)
    if not files:
        raise FastByolError(f"data folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageSource(labels=np.asarray(labels, dtype=np.int64), classes=classes, files=files, root=root)


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated or foreign file
        raise FastByolError(f"cannot read CIFAR batch {path!r}: {e}") from None


def is_cifar_dir(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "data_batch_1")) or os.path.isfile(os.path.join(root, "train"))


def load_cifar(root: str, train: bool = True) -> ImageSource:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``)
    python-pickle batches, as in the official ``cifar-*-python`` archives."""
    if os.path.isfile(os.path.join(root, "data_batch_1")):
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key, meta_name, meta_key = "labels", "batches.meta", "label_names"
    elif os.path.isfile(os.path.join(root, "train")):
        names = ["train"] if train else ["test"]
        key, meta_name, meta_key = "fine_labels", "meta", "fine_label_names"
    else:
        raise FastByolError(f"{root!r} holds no CIFAR batches (data_batch_1 or train)")
    data, labels = [], []
    for n in names:
        p = os.path.join(root, n)
        if not os.path.isfile(p):
            if n.startswith("data_batch_"):
                continue  # partial CIFAR-10 download: use what is there
            raise FastByolError(f"CIFAR batch {p!r} is missing")
        d = _unpickle(p)
        data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(d[key])
    meta_path = os.path.join(root, meta_name)
    classes = _unpickle(meta_path)[meta_key] if os.path.isfile(meta_path) else [str(i) for i in range(max(labels) + 1)]
    return ImageSource(labels=np.asarray(labels, dtype=np.int64), classes=list(classes),
                       array=np.ascontiguousarray(np.concatenate(data)), root=root)


def load_source(root: str, train: bool = True) -> ImageSource:
    """Webdataset shards, a CIFAR batch directory or an image folder, whichever ``root`` is."""
    if is_webdataset(root):
        return scan_webdataset(root)
    if os.path.isdir(root) and is_cifar_dir(root):
        return load_cifar(root, train=train)
    return scan_image_folder(root)


def split_holdout(src: ImageSource, fraction: float, seed: int) -> Tuple[ImageSource, ImageSource]:
    """Carve a stratified labelled hold-out (for kNN) out of a training source."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(src.labels):
        idx = np.flatnonzero(src.labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return src.subset(sorted(train_idx)), src.subset(sorted(val_idx))
