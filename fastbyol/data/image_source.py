"""What a data source is: a labelled list of samples, and how a sample's encoded bytes are read.

:class:`ImageSource` is what every source (:mod:`~fastbyol.data.sources`: class folders, CIFAR
batches; :mod:`~fastbyol.data.webdataset`: tar shards) produces and what both loaders (torch,
DALI) read, through :func:`read_encoded` for encoded images.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

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
