"""The finiteness guard: is the whole training state (online and target parameters, BatchNorm
running statistics, optimizer state) finite, and if not, where is it not?

The loss alone is not enough: in train mode BatchNorm normalises with batch statistics, so the
loss can stay finite while ``running_var`` has already overflowed to inf (issue 14). The check
is one multi-tensor reduction on the device, :func:`nonfinite_flag`, whose result the trainer
reads only at log and checkpoint steps; the infinity norm is used because it is finite exactly
when every element is (an L2 norm overflows on large finite values, and NaN propagates through
a max).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

Named = List[Tuple[str, torch.Tensor]]


def state_tensors(online: nn.Module, target: Optional[nn.Module], optimizer=None) -> Named:
    """``(name, tensor)`` for every floating-point tensor of the training state: ``online.*``,
    ``target.*`` (parameters and buffers) and ``optimizer.<param name>.<key>``."""
    named: Named = []
    for prefix, module in (("online", online), ("target", target)):
        if module is None:
            continue
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and t.numel():
                named.append((f"{prefix}.{name}", t.detach()))
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict) and state:
        names = {id(p): n for n, p in online.named_parameters()}
        for i, (p, st) in enumerate(state.items()):
            pname = names.get(id(p), f"state[{i}]")
            for key, v in st.items() if isinstance(st, dict) else ():
                if torch.is_tensor(v) and v.is_floating_point() and v.numel():
                    named.append((f"optimizer.{pname}.{key}", v.detach()))
    return named


def _max_abs(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Per-tensor max |x| (NaN where a tensor holds NaN) as one fp32 vector on the device."""
    norms = torch._foreach_norm(tensors, float("inf"))
    return torch.stack([n.float() for n in norms])


def nonfinite_flag(named: Named) -> torch.Tensor:
    """A 0-d bool tensor on the state's device: True when any tensor holds NaN or inf.
    No host sync (reading it is one)."""
    if not named:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(_max_abs([t for _, t in named])).all()


def describe_nonfinite(named: Named) -> Optional[str]:
    """Where and what, e.g. ``online.encoder.net.1.running_var holds inf (12 of 64 values), and
    5 more tensors (target.…)``; None when everything is finite. A host sync: error path only."""
    if not named:
        return None
    bad = (~torch.isfinite(_max_abs([t for _, t in named]))).nonzero().flatten().tolist()
    if not bad:
        return None
    name, t = named[bad[0]]
    x = t.float()
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if s)
    more = ""
    if len(bad) > 1:
        more = f", and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''} (next: {named[bad[1]][0]})"
    return f"{name} holds {what} of {x.numel()} values{more}"


def first_nonfinite_in(tensors: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """:func:`describe_nonfinite` over a plain state_dict's floating-point entries."""
    return describe_nonfinite([(k, v) for k, v in tensors if torch.is_tensor(v) and v.is_floating_point()])
