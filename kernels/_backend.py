"""Choosing between a Triton kernel and its PyTorch reference."""
from __future__ import annotations

import os
from typing import Iterable

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, tensors: Iterable[torch.Tensor]) -> bool:
    """Whether to run the Triton kernel for these tensors.

    ``auto``: Triton on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), the
    reference otherwise. ``triton``: the kernel or a clear error. ``torch``: the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    devices = {t.device.type for t in tensors}
    runnable = devices == {"cuda"} or (devices == {"cpu"} and interpreting())
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not runnable:
            raise RuntimeError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                               f"got tensors on {sorted(devices)}")
        return True
    return runnable and triton_available()
