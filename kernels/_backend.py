"""Choosing between a Triton kernel and its PyTorch reference.

Triton is imported lazily (only here, and by the ``_triton_*`` modules when a kernel runs),
so the package and its references work where triton is not installed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Set

import torch

BACKENDS = ("auto", "triton", "torch")
_triton_found = False  # cached once found; a failed import is retried (cheap, and rare)


def triton_available() -> bool:
    """Whether ``import triton`` works."""
    global _triton_found
    if not _triton_found:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        from ._interpreter import fix_scalar_index

        fix_scalar_index()  # triton < 3.7's interpreter under numpy >= 2.4
        _triton_found = True
    return True


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_AS_CUDA: Set[str] = set()  # device types whose tensors take CUDA's path (the cost model's "meta")


@contextlib.contextmanager
def counted_as_cuda(device_type: str):
    """Within it, tensors on ``device_type`` choose the Triton kernels as CUDA tensors do:
    ``fastbyol cost`` runs the step on ``meta`` tensors and counts the launches instead of
    running them (its own ``Launch.run``)."""
    _AS_CUDA.add(device_type)
    try:
        yield
    finally:
        _AS_CUDA.discard(device_type)


def use_triton(backend: str, tensors: Iterable[torch.Tensor]) -> bool:
    """Whether to run the Triton kernel for these tensors.

    Args:
        backend: ``auto``: Triton on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)
            when triton is installed, the reference otherwise. ``triton``: the kernel, or an
            error saying why it cannot run. ``torch``: the reference.
        tensors: the inputs whose devices decide.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: ``backend="triton"`` without triton, or on tensors it cannot run on.

    Examples:
        >>> use_triton("torch", [torch.zeros(1)])
        False
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    tensors = list(tensors)
    if backend == "auto" and not interpreting():  # the common case, without building a device set
        return bool(tensors) and all(t.is_cuda or t.device.type in _AS_CUDA for t in tensors) and triton_available()
    devices = {t.device.type for t in tensors}
    runnable = (bool(devices) and devices <= {"cuda"} | _AS_CUDA) or (devices == {"cpu"} and interpreting())
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable here")
        if not runnable:
            raise RuntimeError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                               f"got tensors on {sorted(devices)}")
        return True
    return runnable and triton_available()


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements from ``data_ptr`` in some
    dimension order (contiguous, channels_last, a transpose, ...): then memory order works."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True
