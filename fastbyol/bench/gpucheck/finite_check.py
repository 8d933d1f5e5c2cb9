"""Part g: the finiteness guard (:func:`fastbyol.finite.nonfinite_flag`, one
``torch._foreach_norm(inf)`` over the training state) on the device it guards: a NaN or an inf
placed at a random element of one tensor is caught, a huge finite value is not (an L2 norm
would overflow there), in fp32 and bf16, over many tensors of awkward sizes (the multi-tensor
kernel's chunking) and one larger than a chunk."""
from __future__ import annotations

from typing import Dict, List

import torch

from fastbyol.finite import describe_nonfinite, nonfinite_flag

from .targets import target


def _state(device: torch.device, dtype: torch.dtype, g: torch.Generator, big: int) -> List:
    sizes = [1, 3, 17, 255, 1000, 4097, big]
    return [(f"t{i}.{n}", torch.randn(n, generator=g).to(device, dtype)) for i, n in enumerate(sizes * 3)]


def part_finite(pc) -> Dict:
    g = torch.Generator().manual_seed(0)
    big = 70_000 if pc.settings.tiny else 5_000_000  # past one multi-tensor chunk (65536 elements)
    rows, failed = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        huge = torch.finfo(dtype).max / 2
        for what, value, caught in (("NaN", float("nan"), True), ("inf", float("inf"), True),
                                    ("-inf", float("-inf"), True), ("huge finite", huge, False)):
            named = _state(pc.device, dtype, g, big)
            clean = bool(nonfinite_flag(named))  # the flag's one read: a host sync, here on purpose
            k = int(torch.randint(len(named), (1,), generator=g))
            t = named[k][1]
            i = int(torch.randint(t.numel(), (1,), generator=g))
            t.view(-1)[i] = value
            flagged = bool(nonfinite_flag(named))
            where = describe_nonfinite(named)
            ok = (not clean) and flagged == caught and ((where or "").startswith(named[k][0] + " ") == caught)
            failed += not ok
            rows.append({"dtype": str(dtype).replace("torch.", ""), "injected": what, "tensor": named[k][0],
                         "element": i, "flag before": clean, "flag after": flagged, "expected": caught,
                         "result": "ok" if ok else "FAIL"})
        pc.save({"rows": rows})
    return {"rows": rows, "failed": failed, "summary": f"{len(rows) - failed} of {len(rows)} injections judged "
            f"right on {pc.device.type} ({'CPU _foreach_norm path' if pc.device.type == 'cpu' else 'CUDA multi-tensor kernel'})",
            "targets": [target("finiteness guard injections misjudged", failed, 0, higher_is_better=False)]}
