"""What a data source is: a labelled list of samples, and how a sample's encoded bytes are read.

:class:`ImageSource` is what every source (:mod:`~fastbyol.data.sources`: class folders, CIFAR
batches; :mod:`~fastbyol.data.webdataset`: tar shards) produces and what both loaders (torch,
DALI) read, through :func:`read_encoded` for encoded images.
"""
from __future__ import annotations

import fcntl
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class PathList(Sequence[str]):
    """Sample paths as numpy arrays: one prefix per group (a class folder, a tar shard) and each
    sample's group number and name relative to it; ``paths[i]`` is ``prefix + sep + name``.

    Why not a list of strings: ImageNet's 1.28 M paths as Python strings take ~160 MiB per
    process, and DataLoader workers touching them copy the pages they sit on (reference counts,
    pytorch issue 13246), so every worker's memory grows through an epoch. Here they are three
    arrays (~30 MiB, no per-sample Python object), which forked workers share untouched.

    Examples:
        >>> p = PathList.from_strings(["/d/a/1.jpg", "/d/b/2.jpg"])
        >>> p[1], len(p), list(p.subset([1, 0])) == ["/d/b/2.jpg", "/d/a/1.jpg"]
        ('/d/b/2.jpg', 2, True)
    """

    def __init__(self, prefixes: Sequence[str], group: np.ndarray, names: np.ndarray, sep: str = os.sep):
        self.prefixes, self.sep = list(prefixes), sep
        self.group = np.asarray(group, dtype=np.int32 if len(self.prefixes) < 2 ** 31 else np.int64)
        self.names = np.asarray(names, dtype=np.bytes_)  # UTF-8, fixed width: one buffer
        if self.group.shape != self.names.shape:
            raise ValueError(f"{self.group.shape[0]} group numbers for {self.names.shape[0]} names")

    @classmethod
    def from_strings(cls, paths: Sequence[str]) -> "PathList":
        """Any list of paths, grouped by folder."""
        folders, group, names, where = [], [], [], {}
        for p in paths:
            folder, name = os.path.split(p)
            if folder not in where:
                where[folder] = len(folders)
                folders.append(folder)
            group.append(where[folder])
            names.append(name.encode())
        return cls(folders, np.asarray(group, dtype=np.int64), np.asarray(names, dtype=np.bytes_))

    def __len__(self) -> int:
        return self.names.shape[0]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        return self.prefixes[self.group[i]] + self.sep + self.names[i].decode()

    def __iter__(self) -> Iterator[str]:
        for g, n in zip(self.group.tolist(), self.names.tolist()):
            yield self.prefixes[g] + self.sep + n.decode()

    def __eq__(self, other) -> bool:
        if isinstance(other, PathList) and (other.prefixes, other.sep) == (self.prefixes, self.sep):
            return np.array_equal(self.group, other.group) and np.array_equal(self.names, other.names)
        return isinstance(other, (PathList, list, tuple)) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def subset(self, idx) -> "PathList":
        return PathList(self.prefixes, self.group[idx], self.names[idx], self.sep)

    @property
    def nbytes(self) -> int:
        return self.group.nbytes + self.names.nbytes + sum(len(p) for p in self.prefixes)


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
    (``shard.tar:member``) for messages; otherwise ``files`` are paths. ``files`` is a
    :class:`PathList` (a list of strings is converted): ``files[i]`` is a string, made on demand.
    ``labels`` are ints in ``[0, len(classes))``. Read sample ``i``'s bytes with :func:`read_encoded`.
    """

    labels: np.ndarray
    classes: List[str]
    files: Optional[Union[PathList, List[str]]] = None
    array: Optional[np.ndarray] = None
    root: str = ""
    tar: Optional[TarMembers] = None

    def __post_init__(self) -> None:
        if self.files is not None and not isinstance(self.files, PathList):
            self.files = PathList.from_strings(self.files)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> "ImageSource":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSource(
            labels=self.labels[idx],
            classes=self.classes,
            files=self.files.subset(idx) if self.files is not None else None,
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


def _read_file(path: str) -> bytes:
    """A whole file, in one ``read`` syscall when the kernel allows (no Python file object:
    several times cheaper than ``open(...).read()`` at tens of thousands of files per second)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        parts = [os.read(fd, size)]
        got = len(parts[0])
        while got < size:  # a short read (network file systems may return less)
            chunk = os.read(fd, size - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def read_encoded(src: ImageSource, i: int) -> bytes:
    """The encoded bytes of sample ``i`` (a file, or a member of a tar shard).

    Shards stay open per process (at most 64) and are read with ``pread``, which moves no
    shared file offset, so forked DataLoader workers read the same shards at once.

    Raises:
        OSError: the file or shard cannot be read, or the member is cut short.
    """
    if src.tar is None:
        return _read_file(src.files[i])
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


def cache_root() -> str:
    """fastbyol's cache folder: ``$FASTBYOL_CACHE``, else ``$XDG_CACHE_HOME/fastbyol`` (``~/.cache``)."""
    return os.environ.get("FASTBYOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastbyol")


@contextmanager
def build_lock(key: str) -> Iterator[None]:
    """Hold the exclusive lock ``<cache>/locks/<key>.lock`` while building a cached index.

    Every rank of a node calls this with the same key: the first builds the index and writes
    the cache, the others wait here and then load what it wrote, so a node reads its tar headers
    or lists its class folders once instead of once per rank. Where the cache folder cannot be
    written (or locked), no lock is held and each process builds its own index.
    """
    try:
        os.makedirs(os.path.join(cache_root(), "locks"), exist_ok=True)
        fd = os.open(os.path.join(cache_root(), "locks", key + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: build unlocked
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def save_npz_atomic(cached: str, **arrays) -> None:
    """``np.savez`` to a private file, then rename: readers never see half a cache."""
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = f"{cached}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, cached)
