"""Finding host syncs: every place Python waits for the device, recorded with where it came from.

On a GPU a device→host read (``.item()``, ``bool(t)`` as in ``if t:``, ``float``, ``int``,
``tolist``, ``numpy``, ``.cpu()``), an op whose output shape depends on the data
(``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing), a tensor built from
Python data for a device (``torch.tensor(..., device=)``: a blocking pageable upload) or an
explicit synchronize stalls
the CPU until the device has drained its queue, so the next kernels are not queued in time.
:func:`record_host_syncs` records each of them, with the innermost frame outside torch, on
any device: on CPU the calls are the same, so a CPU test finds what would stall a GPU.

Examples:
    >>> import torch
    >>> with record_host_syncs() as syncs:
    ...     x = torch.ones(3)
    ...     y = (x * 2).sum()           # no sync
    ...     if y > 0:                   # bool(tensor): a sync
    ...         pass
    >>> [s.what for s in syncs]
    ['Tensor.__bool__']
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Iterator, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods and torch functions that read device data on the host, or upload Python data.
_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "numpy", "cpu",
          "nonzero", "masked_select", "unique", "unique_consecutive", "equal", "allclose", "is_nonzero"}
_UPLOADS = {"tensor", "as_tensor"}  # (from_numpy takes no device: never an upload)
# The same at the aten level, for ops reached from C++ (e.g. boolean indexing calls nonzero).
_ATEN = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
         "is_nonzero", "equal"}
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass
class HostSync:
    """One recorded sync: what was called and the innermost caller outside torch."""

    what: str
    where: str  # "file:line in function"
    stack: str  # the full stack, for debugging

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"


def _ignored(filename: str) -> bool:
    return filename.startswith(_TORCH_DIR) or filename == __file__  # torch's own frames, and ours


def _record(out: List[HostSync], what: str) -> None:
    frames = traceback.extract_stack()[:-1]
    if any(f"{os.sep}triton{os.sep}" in f.filename for f in frames):
        return  # inside the Triton interpreter: running a kernel on CPU (on a GPU a launch), not a host read
    where = next((f for f in reversed(frames) if not _ignored(f.filename)), None)
    if where is None:
        return
    out.append(HostSync(what, f"{os.path.relpath(where.filename)}:{where.lineno} in {where.name}",
                        "".join(traceback.format_list(frames[-12:]))))


class _Functions(TorchFunctionMode):
    def __init__(self, out: List[HostSync]):
        super().__init__()
        self.out, self.depth = out, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # A tensor from Python data counts where it names a device (a host tensor is no upload).
        hit = name in _READS or (name in _UPLOADS and kwargs.get("device") is not None) or (
            name == "to" and _to_host(args, kwargs))
        if hit and self.depth == 0:
            owner = "Tensor" if name not in _UPLOADS else "torch"
            _record(self.out, f"{owner}.{name}")
        self.depth += hit
        try:
            return func(*args, **kwargs)
        finally:
            self.depth -= hit


def _to_host(args, kwargs) -> bool:
    """``t.to(cpu)`` from another device (on a CPU-only run, ``.cpu()`` is what shows)."""
    dev = kwargs.get("device", args[1] if len(args) > 1 else None)
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return (isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu" and src is not None
            and src.device.type != "cpu")


class _Aten(TorchDispatchMode):
    def __init__(self, out: List[HostSync], functions: _Functions):
        super().__init__()
        self.out, self.functions = out, functions

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if (name in _ATEN or bool_index) and self.functions.depth == 0:
            _record(self.out, f"aten.{name}" + (" (boolean mask)" if bool_index else ""))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_host_syncs() -> Iterator[List[HostSync]]:
    """Record every host sync made inside the block (see the module docstring); yields the
    list, filled as they happen. Explicit ``torch.cuda.synchronize`` and DeepSpeed's
    accelerator ``synchronize`` (its timers) are recorded too."""
    out: List[HostSync] = []
    functions = _Functions(out)
    patched = []

    def wrap(owner, attr, label):
        real, own = getattr(owner, attr), attr in vars(owner)

        def synchronize(*a, **kw):
            _record(out, label)
            return real(*a, **kw)

        setattr(owner, attr, synchronize)
        patched.append((owner, attr, real, own))

    wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
    if "deepspeed.accelerator" in sys.modules:
        accel = sys.modules["deepspeed.accelerator"].get_accelerator()
        wrap(accel, "synchronize", f"{type(accel).__name__}.synchronize")
    try:
        with functions, _Aten(out, functions):
            yield out
    finally:
        for owner, attr, real, own in reversed(patched):
            if own:
                setattr(owner, attr, real)
            else:  # an instance that had the class's method: drop the instance attribute
                delattr(owner, attr)
