"""Where images come from: ImageNet-style class folders, webdataset tar shards and CIFAR
python-pickle batches.

Each is turned into a :class:`ImageSource`: a list of samples (encoded images, as files or
as members of tar shards, or an in-memory uint8 array) with integer labels, which the torch
and the DALI loaders read through :func:`read_encoded`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import FastByolError

log = logging.getLogger("fastbyol.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class TarMembers:
    """Where each sample's encoded bytes lie inside uncompressed tar shards."""

    shards: List[str]  # shard paths
    index: np.ndarray  # [N, 3] int64: shard number, byte offset of the member's data, size


@dataclass
class ImageSource:
    """A labelled image collection.

    Exactly one of ``files`` (encoded images) and ``array`` (uint8 ``[N, H, W, 3]``) is set.
    With ``tar`` set, the encoded images are tar members and ``files`` holds their names
    (``shard.tar:member``) for messages; otherwise ``files`` are paths. ``labels`` are ints in
    ``[0, len(classes))``. Read sample ``i``'s bytes with :func:`read_encoded`.
    """

    labels: np.ndarray
    classes: List[str]
    files: Optional[List[str]] = None
    array: Optional[np.ndarray] = None
    root: str = ""
    tar: Optional[TarMembers] = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> "ImageSource":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSource(
            labels=self.labels[idx],
            classes=self.classes,
            files=[self.files[i] for i in idx] if self.files is not None else None,
            array=self.array[idx] if self.array is not None else None,
            root=self.root,
            tar=TarMembers(self.tar.shards, self.tar.index[idx]) if self.tar is not None else None,
        )


_shard_fds: "OrderedDict[Tuple[int, str], int]" = OrderedDict()  # (pid, shard path) → descriptor, LRU
_shard_lock = threading.Lock()
_MAX_OPEN_SHARDS = 64  # under the usual 1024-descriptor limit, whatever the shard count


def _after_fork() -> None:  # a DataLoader worker forked while another thread held the lock
    global _shard_lock
    _shard_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def read_encoded(src: ImageSource, i: int) -> bytes:
    """The encoded bytes of sample ``i`` (a file, or a member of a tar shard).

    Shards stay open per process (at most 64) and are read with ``pread``, which moves no
    shared file offset, so forked DataLoader workers read the same shards at once.

    Raises:
        OSError: the file or shard cannot be read, or the member is cut short.
    """
    if src.tar is None:
        with open(src.files[i], "rb") as fh:
            return fh.read()
    shard, offset, size = (int(v) for v in src.tar.index[i])
    key = (os.getpid(), src.tar.shards[shard])
    with _shard_lock:  # no thread closes a descriptor another is reading from
        fd = _shard_fds.get(key)
        if fd is None:
            fd = _shard_fds[key] = os.open(key[1], os.O_RDONLY)
            if len(_shard_fds) > _MAX_OPEN_SHARDS:
                (pid, _), old = _shard_fds.popitem(last=False)
                if pid == key[0]:  # a parent's descriptor is not this process's to close
                    os.close(old)
        else:
            _shard_fds.move_to_end(key)
        data = os.pread(fd, size, offset)
    if len(data) < size:
        raise OSError(f"{src.files[i]} is cut short ({len(data)} of {size} bytes)")
    return data


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


# ----------------------------------------------------------------------------- webdataset shards

_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def expand_braces(pattern: str) -> List[str]:
    """Expand webdataset/bash brace patterns: ``s-{000..012}.tar`` (zero padding kept) and
    ``{train,extra}.tar``; several groups multiply out, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise FastByolError(f"shard pattern {pattern!r}: empty range {{{body}}}")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def is_webdataset(spec: str) -> bool:
    """A ``.tar`` file, a brace pattern of them, or a folder of ``.tar`` files with no class
    sub-folders."""
    low = spec.lower()
    if low.endswith(_COMPRESSED) or low.endswith(".tar") or ("{" in spec and ".tar" in low):
        return True
    if not os.path.isdir(spec):
        return False
    entries = [e for e in os.scandir(spec) if not e.name.startswith(".")]
    return any(e.is_file() and e.name.lower().endswith(".tar") for e in entries) and not any(
        e.is_dir() for e in entries)


def _shard_paths(spec: str) -> List[str]:
    if os.path.isdir(spec):
        shards = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.lower().endswith(".tar"))
    else:
        shards = expand_braces(spec)
    for path in shards:
        if path.lower().endswith(_COMPRESSED):
            raise FastByolError(f"{path!r} is compressed; samples are read at their offsets, so shards "
                                f"must be plain .tar (decompress them once)")
        if not os.path.isfile(path):
            raise FastByolError(f"tar shard {path!r} does not exist")
    return shards


def _read_tar_index(path: str) -> Tuple[List[Tuple[str, int, int, Optional[int]]], bool]:
    """``([(member name, data offset, size, class or None)], complete)`` for every sample of a
    shard that has an image; samples are the webdataset groups of members sharing a key (the
    path up to the first dot of the file name). ``complete`` is False when the shard breaks off."""
    images: Dict[str, Tuple[str, int, int]] = {}
    classes: Dict[str, int] = {}
    complete, key, end = True, None, os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                folder, name = os.path.split(m.name)
                if "." not in name or name.startswith("."):
                    continue
                stem, ext = name.split(".", 1)
                key, ext = os.path.join(folder, stem), "." + ext.lower()
                if ext in IMAGE_EXTENSIONS and key not in images:
                    if m.offset_data + m.size > end:  # cut off, though tarfile read its header
                        raise tarfile.ReadError("unexpected end of data")
                    images[key] = (m.name, m.offset_data, m.size)
                elif ext == ".cls":
                    text = tar.extractfile(m).read().decode("utf-8", "replace").strip()
                    try:
                        classes[key] = int(text)
                    except ValueError:
                        raise FastByolError(f"{path}:{m.name} holds {text[:20]!r}, not a class number") from None
    except tarfile.ReadError as e:
        images.pop(key, None)  # the group read last may have lost members (its label, its data)
        if not images:
            raise FastByolError(f"cannot read tar shard {path!r}: {e}") from None
        complete = False
    return [(name, off, size, classes.get(key)) for key, (name, off, size) in images.items()], complete


def cache_root() -> str:
    """fastbyol's cache folder: ``$FASTBYOL_CACHE``, else ``$XDG_CACHE_HOME/fastbyol`` (``~/.cache``)."""
    return os.environ.get("FASTBYOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastbyol")


def _index_tar(path: str) -> Tuple[List[Tuple[str, int, int, Optional[int]]], bool]:
    """:func:`_read_tar_index`, kept in the cache (keyed by the shard's path, size and mtime):
    reading ImageNet's 2.5 M tar headers takes about a minute per process, a cached index
    milliseconds, so resumed and repeated runs start at once."""
    st = os.stat(path)
    name = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:20] + ".npz"
    cached = os.path.join(cache_root(), "wds-index", name)
    stamp = np.asarray([st.st_size, st.st_mtime_ns], dtype=np.int64)
    try:
        with np.load(cached, allow_pickle=False) as z:
            if np.array_equal(z["stamp"], stamp):
                return ([(str(n), int(o), int(sz), None if c < 0 else int(c))
                         for n, o, sz, c in zip(z["names"], z["offsets"], z["sizes"], z["classes"])],
                        bool(z["complete"]))
    except (OSError, KeyError, ValueError):
        pass  # no index yet, or one from another version: read the headers
    members, complete = _read_tar_index(path)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp.npz"  # ranks may write it at once: each its own file, then rename
        np.savez(tmp, stamp=stamp, complete=complete, names=np.asarray([m[0] for m in members], dtype=str),
                 offsets=np.asarray([m[1] for m in members], dtype=np.int64).reshape(-1),
                 sizes=np.asarray([m[2] for m in members], dtype=np.int64).reshape(-1),
                 classes=np.asarray([-1 if m[3] is None else m[3] for m in members], dtype=np.int64).reshape(-1))
        os.replace(tmp, cached)
    except OSError as e:  # a read-only cache costs only the next start's time
        log.debug("cannot cache the index of %s: %s", path, e)
    return members, complete


def scan_webdataset(spec: str) -> ImageSource:
    """Index webdataset tar shards: one ``.tar``, a brace pattern (``shards-{0000..0146}.tar``)
    or a folder of ``.tar`` files. A sample is a group of members sharing a key (``0001.jpg``,
    ``0001.cls``); its label is the integer in ``.cls``. Without any ``.cls``, all samples form
    one unlabelled class.

    Members are indexed by byte offset and read at random (:func:`read_encoded`), so shuffling,
    sharding per rank and exact resume work as for folders; shards must therefore be plain
    (uncompressed) tar files on a seekable file system.

    Raises:
        FastByolError: a missing, compressed or unreadable shard, no images, a bad or missing label.
    """
    shards = _shard_paths(spec)
    if not shards:
        raise FastByolError(f"{spec!r} holds no .tar shards")
    with ThreadPoolExecutor(min(8, len(shards))) as pool:  # header reads: I/O bound
        indexed = list(pool.map(_index_tar, shards))
    names, index, labels = [], [], []
    for k, (path, (members, complete)) in enumerate(zip(shards, indexed)):
        if not complete:
            log.warning("tar shard %s breaks off; using its first %d complete samples", path, len(members))
        for name, off, size, cls in members:
            names.append(f"{path}:{name}")
            index.append((k, off, size))
            labels.append(cls)
    if not names:
        raise FastByolError(f"the tar shards of {spec!r} hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    unlabelled = sum(c is None for c in labels)
    if unlabelled == len(labels):
        classes, labels = ["."], [0] * len(labels)
    elif unlabelled:
        raise FastByolError(f"{unlabelled} of {len(labels)} samples in {spec!r} have no .cls label")
    elif min(labels) < 0:
        raise FastByolError(f"negative class number {min(labels)} in {spec!r}")
    else:
        classes = [str(c) for c in range(max(labels) + 1)]
    return ImageSource(labels=np.asarray(labels, dtype=np.int64), classes=classes, files=names, root=spec,
                       tar=TarMembers(shards, np.asarray(index, dtype=np.int64).reshape(-1, 3)))


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
