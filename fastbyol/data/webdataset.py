"""Webdataset tar shards as a source: one ``.tar``, a brace pattern or a folder of shards.

Shards are indexed (member offsets, from the tar headers; cached) and their members read at
random, so they shuffle, shard per rank and resume exactly like class folders.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import FastByolError
from .image_source import IMAGE_EXTENSIONS, ImageSource, PathList, TarMembers, build_lock, cache_root, save_npz_atomic

log = logging.getLogger("fastbyol.data")

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


Members = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # names (bytes), offsets, sizes, classes (-1: none)
WDS_INDEX_VERSION = 2  # 2: member names as bytes


def _members(rows: List[Tuple[str, int, int, int]]) -> Members:
    return (np.asarray([r[0].encode() for r in rows], dtype=np.bytes_),
            *(np.asarray([r[k] for r in rows], dtype=np.int64).reshape(-1) for k in (1, 2, 3)))


def _read_tar_index(path: str) -> Tuple[Members, bool]:
    """``((member names, data offsets, sizes, classes or -1), complete)`` for every sample of a
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
                    if classes[key] < 0:
                        raise FastByolError(f"negative class number {classes[key]} in {path}:{m.name}")
    except tarfile.ReadError as e:
        images.pop(key, None)  # the group read last may have lost members (its label, its data)
        if not images:
            raise FastByolError(f"cannot read tar shard {path!r}: {e}") from None
        complete = False
    return _members([(name, off, size, classes.get(key, -1)) for key, (name, off, size) in images.items()]), complete


def _cache_path(path: str) -> str:
    key = hashlib.sha1(f"{WDS_INDEX_VERSION}:{os.path.abspath(path)}".encode()).hexdigest()[:20]
    return os.path.join(cache_root(), "wds-index", key + ".npz")


def _cached_tar_index(path: str) -> Optional[Tuple[Members, bool]]:
    st = os.stat(path)
    try:
        with np.load(_cache_path(path), allow_pickle=False) as z:
            if np.array_equal(z["stamp"], [st.st_size, st.st_mtime_ns]):
                return (z["names"], z["offsets"], z["sizes"], z["classes"]), bool(z["complete"])
    except (OSError, KeyError, ValueError):
        pass  # no index yet, or one from another version: read the headers
    return None


def _index_tar(path: str) -> Tuple[Members, bool]:
    """:func:`_read_tar_index`, kept in the cache (keyed by the shard's path, size and mtime):
    reading ImageNet's 2.5 M tar headers takes about a minute, a cached index milliseconds, so
    resumed and repeated runs start at once."""
    hit = _cached_tar_index(path)
    if hit is not None:
        return hit
    st = os.stat(path)
    members, complete = _read_tar_index(path)
    try:
        save_npz_atomic(_cache_path(path), stamp=np.asarray([st.st_size, st.st_mtime_ns], dtype=np.int64),
                        complete=complete, names=members[0], offsets=members[1], sizes=members[2],
                        classes=members[3])
    except OSError as e:  # a read-only cache costs only the next start's time
        log.debug("cannot cache the index of %s: %s", path, e)
    return members, complete


def _index_shards(shards: List[str]) -> Tuple[Members, np.ndarray, np.ndarray]:
    """All shards' members concatenated, samples per shard, whether each shard is complete.

    A warm start loads one file: the whole set's index, checked against every shard's size and
    mtime. Otherwise each shard's own index comes from the cache or its headers, read by one
    process per cache folder (a node) while the other ranks wait (:func:`build_lock`), and the
    set's index is written for the next start.
    """
    stamp = np.asarray([[st.st_size, st.st_mtime_ns] for st in map(os.stat, shards)], dtype=np.int64)
    key = hashlib.sha1("\n".join(map(os.path.abspath, shards)).encode()).hexdigest()[:20]
    whole = os.path.join(cache_root(), "wds-sets", f"{WDS_INDEX_VERSION}-{key}.npz")

    def load_whole():
        try:
            with np.load(whole, allow_pickle=False) as z:
                if np.array_equal(z["stamp"], stamp):
                    return (z["names"], z["offsets"], z["sizes"], z["classes"]), z["counts"], z["complete"]
        except (OSError, KeyError, ValueError):
            pass
        return None

    hit = load_whole()
    if hit is not None:
        return hit
    with build_lock("wds-" + key):
        hit = load_whole()  # written by another rank while this one waited
        if hit is not None:
            return hit
        with ThreadPoolExecutor(min(8, len(shards))) as pool:  # header reads: I/O bound
            indexed = list(pool.map(_index_tar, shards))
        members = tuple(np.concatenate([m[k] for m, _ in indexed]) for k in range(4))
        counts = np.asarray([len(m[0]) for m, _ in indexed], dtype=np.int64)
        complete = np.asarray([c for _, c in indexed], dtype=bool)
        try:
            save_npz_atomic(whole, stamp=stamp, names=members[0], offsets=members[1], sizes=members[2],
                            classes=members[3], counts=counts, complete=complete)
        except OSError as e:
            log.debug("cannot cache the index of %d shards: %s", len(shards), e)
    return members, counts, complete


def scan_webdataset(spec: str) -> ImageSource:
    """Index webdataset tar shards: one ``.tar``, a brace pattern (``shards-{0000..0146}.tar``)
    or a folder of ``.tar`` files. A sample is a group of members sharing a key (``0001.jpg``,
    ``0001.cls``); its label is the integer in ``.cls``. Without any ``.cls``, all samples form
    one unlabelled class.

    Members are indexed by byte offset and read at random (:func:`read_encoded`), so shuffling,
    sharding per rank and exact resume work as for folders; shards must therefore be plain
    (uncompressed) tar files on a seekable file system. The index is numpy arrays (member
    names as a :class:`~fastbyol.data.image_source.PathList` with the shards as prefixes).

    Raises:
        FastByolError: a missing, compressed or unreadable shard, no images, a bad or missing label.
    """
    shards = _shard_paths(spec)
    if not shards:
        raise FastByolError(f"{spec!r} holds no .tar shards")
    (names, offsets, sizes, labels), counts, complete = _index_shards(shards)
    for path, n, ok in zip(shards, counts.tolist(), complete.tolist()):
        if not ok:
            log.warning("tar shard %s breaks off; using its first %d complete samples", path, n)
    if not len(names):
        raise FastByolError(f"the tar shards of {spec!r} hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), counts)
    index = np.stack([shard_of, offsets, sizes], axis=1)
    unlabelled = int((labels < 0).sum())
    if unlabelled == len(labels):
        classes, labels = ["."], np.zeros(len(labels), dtype=np.int64)
    elif unlabelled:
        raise FastByolError(f"{unlabelled} of {len(labels)} samples in {spec!r} have no .cls label")
    else:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    files = PathList(shards, shard_of.astype(np.int32), names, sep=":")
    return ImageSource(labels=labels, classes=classes, files=files, root=spec, tar=TarMembers(shards, index))
