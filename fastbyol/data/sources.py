"""Where images come from: ImageNet-style class folders, CIFAR python-pickle batches, and
webdataset tar shards (:mod:`~fastbyol.data.webdataset`); :func:`load_source` picks by path.

Each is turned into an :class:`~fastbyol.data.image_source.ImageSource`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import FastByolError
from .image_source import IMAGE_EXTENSIONS, ImageSource, PathList, build_lock, cache_root, save_npz_atomic
from .webdataset import is_webdataset, scan_webdataset

log = logging.getLogger("fastbyol.data")


FOLDER_INDEX_VERSION = 1


def _list_class(folder: str, rel: str, names: List[str], dirs: List[str]) -> None:
    """Image names under ``folder`` (relative to the class folder, sorted, a folder's own files
    before its sub-folders'), and every folder visited (for the cache's stamp)."""
    dirs.append(rel)
    files, subdirs = [], []
    for e in os.scandir(os.path.join(folder, rel) if rel else folder):
        if e.is_dir():  # follows links, as os.walk(followlinks=True)
            subdirs.append(e.name)
        elif e.name.lower().endswith(IMAGE_EXTENSIONS):
            files.append(e.name)
    names.extend(os.path.join(rel, n) if rel else n for n in sorted(files))
    for d in sorted(subdirs):
        _list_class(folder, os.path.join(rel, d) if rel else d, names, dirs)


def _scan_folder(root: str) -> Tuple[ImageSource, List[str]]:
    """The index, and every folder listed (relative to ``root``)."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    names, labels, dirs = [], [], [""]
    for label, cls in enumerate(classes):
        mine: List[str] = []
        sub: List[str] = []
        _list_class(os.path.join(root, cls), "", mine, sub)
        dirs.extend(os.path.join(cls, d) if d else cls for d in sub)
        # one class's strings at a time: the whole tree never exists as Python objects
        names.append(np.char.encode(np.asarray(mine, dtype=str), "utf-8") if mine else np.zeros(0, "S1"))
        labels.append(np.full(len(mine), label, dtype=np.int64))
    prefixes = [os.path.join(root, c) for c in classes]
    if not sum(len(n) for n in names):  # flat folder of images: one class
        flat = sorted(n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTENSIONS))
        if flat:
            classes, prefixes = ["."], [root]
            names, labels = [np.char.encode(np.asarray(flat, dtype=str), "utf-8")], [np.zeros(len(flat), np.int64)]
    if not sum(len(n) for n in names):
        raise FastByolError(f"data folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels_all = np.concatenate(labels)
    files = PathList(prefixes, labels_all.astype(np.int32), np.concatenate(names))
    return ImageSource(labels=labels_all, classes=classes, files=files, root=root), dirs


def _dir_stamp(root: str, dirs: Sequence[str]) -> Optional[np.ndarray]:
    """Modification times (ns) of ``root`` and the listed folders; None when one is gone.
    A folder's time changes when an entry is added, removed or renamed in it."""
    try:
        return np.asarray([os.stat(os.path.join(root, d) if d else root).st_mtime_ns for d in dirs], np.int64)
    except OSError:
        return None


def _folder_cache_path(root: str) -> str:
    key = hashlib.sha1(f"{FOLDER_INDEX_VERSION}:{os.path.abspath(root)}".encode()).hexdigest()[:20]
    return os.path.join(cache_root(), "folder-index", key + ".npz")


def _load_folder_index(cached: str, root: str) -> Optional[ImageSource]:
    try:
        with np.load(cached, allow_pickle=False) as z:
            dirs = [d.decode() for d in z["dirs"].tolist()]
            stamp = _dir_stamp(root, dirs)
            if stamp is None or not np.array_equal(stamp, z["stamp"]) or str(z["root"]) != os.path.abspath(root):
                return None
            classes = [str(c) for c in z["classes"].tolist()]
            labels, names = z["labels"], z["names"]
    except (OSError, KeyError, ValueError):
        return None  # no cache yet, or an unreadable or foreign one
    prefixes = [root] if classes == ["."] else [os.path.join(root, c) for c in classes]
    files = PathList(prefixes, labels.astype(np.int32), names)
    return ImageSource(labels=labels, classes=classes, files=files, root=root)


def scan_image_folder(root: str, cache: bool = True) -> ImageSource:
    """Index an ImageNet-style folder: ``root/<class>/<image>`` (sub-folders of a class included).

    Images directly in ``root`` (no class folders) are accepted as one unlabelled class.
    Files are sorted, so the index is the same on every rank. Paths are held as numpy arrays
    (:class:`~fastbyol.data.image_source.PathList`).

    With ``cache``, the index is kept in fastbyol's cache (``folder-index/``), keyed by the root
    and checked against the modification times of every folder it lists (adding, removing or
    renaming an image changes its folder's time), so a repeated start stats ~1,000 folders
    instead of listing 1.28 M files. On a miss, one process per cache folder (a node, with a
    node-local cache) lists the tree while the others wait for it (:func:`build_lock`).

    Raises:
        FastByolError: the folder is missing, or holds no image files.
    """
    if not os.path.exists(root):
        raise FastByolError(f"data folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise FastByolError(f"data path {root!r} is not a folder")
    if not cache:
        return _scan_folder(root)[0]
    cached = _folder_cache_path(root)
    src = _load_folder_index(cached, root)
    if src is not None:
        return src
    with build_lock("folder-" + os.path.basename(cached)[:-4]):
        src = _load_folder_index(cached, root)  # built by another rank while this one waited
        if src is not None:
            return src
        src, dirs = _scan_folder(root)
        stamp = _dir_stamp(root, dirs)
        if stamp is not None:
            try:
                save_npz_atomic(cached, root=np.asarray(os.path.abspath(root)), stamp=stamp,
                                dirs=np.char.encode(np.asarray(dirs, dtype=str), "utf-8"),
                                classes=np.asarray(src.classes, dtype=str), labels=src.labels,
                                names=src.files.names)
            except OSError as e:  # a read-only cache costs only the next start's time
                log.debug("cannot cache the index of %s: %s", root, e)
    return src


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
    """Carve a stratified labelled hold-out (for kNN) out of a training source.

    One stable sort of the labels gives every class's indices (ascending) at once; each is
    shuffled by the seeded generator, class after class, and its first ``round(n * fraction)``
    (at least 1, at most ``n - 1``; none of a one-sample class) are held out.
    """
    rng = np.random.default_rng(seed)
    order = np.argsort(src.labels, kind="stable")
    _, starts, counts = np.unique(src.labels[order], return_index=True, return_counts=True)
    held = np.zeros(len(src), dtype=bool)
    for start, n in zip(starts.tolist(), counts.tolist()):
        idx = order[start:start + n].copy()
        rng.shuffle(idx)
        n_val = min(max(int(round(n * fraction)), 1), n - 1) if n > 1 else 0
        held[idx[:n_val]] = True
    return src.subset(np.flatnonzero(~held)), src.subset(np.flatnonzero(held))
