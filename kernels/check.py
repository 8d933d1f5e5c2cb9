"""The fused kernels against float64 references on one device: the compiled-kernel check.

The test suite runs the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``, which is
process-wide: the same process cannot also compile them for a GPU. This module runs the same
float64 comparisons on the device it is given, compiled there, including the sizes the
benchmarks time (B=4096, D=256; 165 and 200 tensors). It needs only torch and triton, so it
runs wherever the kernels do (``fastbyol gpu-check`` runs it first):

    python -m fastbyol_kernels.check --device cuda            # on a GPU: compiled kernels
    TRITON_INTERPRET=1 python -m fastbyol_kernels.check --device cpu --quick   # the interpreter

Prints one line per case and exits 1 when any case is off.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Tuple

import torch

from . import byol_loss, ema_update_, lars_step_, normalized_l2_loss

EPS = 1e-12  # F.normalize's
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}


def ref_rows(p, z):
    """float64 ``2 − 2·cos`` with F.normalize's max(‖x‖, eps)."""
    p, z = p.double(), z.double()
    pn = p / p.norm(dim=1, keepdim=True).clamp_min(EPS)
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(EPS)
    return 2 - 2 * (pn * zn).sum(1)


def ref_byol(p1, p2, z1, z2):
    return (ref_rows(p1, z2) + ref_rows(p2, z1)).mean()


EMA_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6),
           torch.float16: dict(rtol=2 ** -10, atol=1e-6)}


def _randn(shape, dtype, device, g) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def check_byol_loss(B: int, D: int, dtype: torch.dtype, device: str, seed: int) -> None:
    """Loss and all four gradients of :func:`byol_loss` against float64."""
    g = torch.Generator().manual_seed(seed)
    xs = [_randn((B, D), dtype, device, g).requires_grad_() for _ in range(4)]
    if dtype != torch.float16:  # a zero row's gradient is ~1/eps = 1e12: beyond fp16's range (inf)
        with torch.no_grad():
            xs[0][0].zero_()  # F.normalize's eps
    loss = byol_loss(*xs, backend="triton")
    loss.backward()
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    ref = ref_byol(*ref_in)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, **TOL[dtype])
    for x, r in zip(xs, ref_in):  # per row, relative to the two terms the gradient is a difference of
        terms = 2.0 / B / x.detach().double().norm(dim=1, keepdim=True).clamp_min(1e-6)
        scale = torch.maximum(r.grad.abs().amax(1, keepdim=True), terms)
        torch.testing.assert_close(x.grad.double() / scale, r.grad / scale, **TOL[dtype])


def check_pair_loss_non_contiguous(B: int, D: int, device: str, seed: int) -> None:
    """:func:`normalized_l2_loss` rows and gradients on strided views."""
    g = torch.Generator().manual_seed(seed)
    p = _randn((2 * B, D), torch.float32, device, g)[::2].requires_grad_()
    z = _randn((D, B), torch.float32, device, g).t().requires_grad_()
    rows = normalized_l2_loss(p, z, backend="triton")
    w = _randn((B,), torch.float32, device, g)
    (rows * w).sum().backward()
    p64, z64 = p.detach().double().requires_grad_(), z.detach().double().requires_grad_()
    ref = ref_rows(p64, z64)
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(rows.double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(p.grad.double(), p64.grad, **TOL[torch.float32])
    torch.testing.assert_close(z.grad.double(), z64.grad, **TOL[torch.float32])


def check_ema(n: int, t_dtype: torch.dtype, o_dtype: torch.dtype, device: str, seed: int,
              tensor_momentum: bool) -> None:
    """:func:`ema_update_` over ``n`` tensors of odd sizes; every element written."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(1,), (7,), (1000,), (3, 5, 7), (4097,), (2, 2049), (513, 257)]
    shapes = [sizes[i % len(sizes)] for i in range(n)]
    ts = [_randn(s, t_dtype, device, g) for s in shapes]
    os_ = [_randn(s, o_dtype, device, g) for s in shapes]
    m = 0.996
    expected = [m * t.double() + (1 - m) * o.double() for t, o in zip(ts, os_)]
    ema_update_(ts, os_, torch.tensor(m, device=device) if tensor_momentum else m, backend="triton")
    for t, e in zip(ts, expected):
        assert t.dtype == t_dtype
        torch.testing.assert_close(t.double(), e, **EMA_TOL[t_dtype])
    for t in ts:
        t.fill_(12345.0)  # momentum 0 must overwrite every element with the online value
    ema_update_(ts, os_, 0.0, backend="triton")
    assert all(torch.equal(t, o.to(t_dtype)) for t, o in zip(ts, os_))


def check_ema_exact_weight(device: str) -> None:
    """From 0 toward 1 the result is the weight itself: fp32(1 − m), 1 − m formed in double
    (float momentum) or fp64 (device tensor), also where fp32 1 − m would be quantised."""
    for m in (0.3, 0.996, 0.9999, 1 - 3e-8):
        want = torch.tensor(1 - m, dtype=torch.float64).float().item()
        for mm in (m, torch.tensor(m, dtype=torch.float64, device=device)):
            t = torch.zeros(9000, device=device)
            ema_update_([t], [torch.ones(9000, device=device)], mm, backend="triton")
            assert torch.all(t == want), f"m={m} ({type(mm).__name__}): weight {t[0].item()!r}, want {want!r}"


def check_ema_stochastic(device: str) -> None:
    """bf16 stochastic rounding: only the two neighbours, unbiased, seeded."""
    n = 1 << 16
    t = torch.ones(n, dtype=torch.bfloat16, device=device)
    o = torch.full((n,), 1.05, dtype=torch.bfloat16, device=device)
    a, b = t.clone(), t.clone()
    ema_update_([a], [o], 0.999, backend="triton", stochastic_rounding=True, seed=7)
    ema_update_([b], [o], 0.999, backend="triton", stochastic_rounding=True, seed=7)
    assert torch.equal(a, b)
    exact = 0.999 + 0.001 * o[0].double().item()
    assert set(a.double().unique().tolist()) <= {1.0, 1.0 + 2 ** -7}
    assert abs(a.double().mean().item() - exact) < 3e-5, a.double().mean().item()


def check_ema_equals_lerp(device: str) -> None:
    """bf16, fp16 and fp32 targets: bit for bit ``torch.lerp(t, o, 1 − m)`` (its fma, both
    branches, one rounding to nearest even), the value AveragedModel and timm's ModelEmaV3 get."""
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t, o = _randn((4099,), dtype, device, g), _randn((4099,), dtype, device, g)
        for m in (0.2, 0.9, 0.9999):
            want = t.float().lerp(o.float(), 1 - m).to(dtype)
            got = t.clone()
            ema_update_([got], [o], m, backend="triton")
            assert torch.equal(got, want), f"{str(dtype)[6:]} m={m}: {(got != want).sum().item()} of 4099 differ"


def check_photometric(B: int, size: int, device: str, seed: int) -> None:
    """:func:`~.augment.photometric` on uint8 crops against float64 (every op order, a tenth of
    the samples blurred), and its bf16/fp16 outputs as the fp32 output rounded to nearest even."""
    import numpy as np

    from .augment import PARAM_COLUMNS, photometric, photometric_reference

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, 2, 3, size, size), dtype=torch.uint8, generator=g).to(device)[:, 1]
    p = torch.zeros(B, len(PARAM_COLUMNS))
    p[:, :2] = (torch.rand(B, 2, generator=g) < 0.7).float()  # flip, jitter
    p[:, 2:5] = 0.5 + torch.rand(B, 3, generator=g)
    p[:, 5] = 0.4 * torch.rand(B, generator=g) - 0.2
    p[:, 6:10] = torch.stack([torch.randperm(4, generator=g) for _ in range(B)]).float()
    p[:, 10:12] = (torch.rand(B, 2, generator=g) < 0.3).float()  # gray, solarize
    blur = dict(blurred=np.arange(0, B, 10), sigma=np.linspace(0.1, 2.0, len(range(0, B, 10))),
                kernel_size=max(3, round(size * 0.1)) | 1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = photometric(x, p, mean, std, **blur, backend="triton")
    want = photometric_reference(x, p, mean, std, **blur, compute_dtype=torch.float64,
                                 out_dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        low = photometric(x, p, mean, std, out_dtype=dtype, channels_last=True, **blur, backend="triton")
        assert torch.equal(low, got.to(dtype)), f"{str(dtype)[6:]}: {(low != got.to(dtype)).sum().item()} differ"


def check_lars(n: int, dtype: torch.dtype, device: str, seed: int) -> None:
    """:func:`lars_step_` (weights, then excluded) over ``n`` tensors of odd sizes, one all
    zero (trust 1), against the formulas in fp64; run twice on the same inputs, bit for bit equal."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(1,), (7,), (3, 5, 7), (4097,), (2, 2049), (513, 257)]
    shapes = [sizes[i % len(sizes)] for i in range(n)]
    lr, m, wd, eta = 0.3, 0.9, 1e-2, 1e-3
    for adapt in (True, False):
        ws, gs, bs = ([_randn(s, dtype, device, g) for s in shapes] for _ in range(3))
        ws[0].zero_()
        want_w, want_b = [], []
        for w, gr, b in zip(ws, gs, bs):
            w, gr, b = w.double(), gr.double(), b.double()
            u = gr + wd * w if adapt else gr
            trust = eta * w.norm() / u.norm() if adapt and w.norm() > 0 and u.norm() > 0 else 1.0
            nb = m * b + trust * u
            want_b.append(nb), want_w.append(w - lr * nb)
        again = [[t.clone() for t in ts] for ts in (ws, gs, bs)]
        for w_, g_, b_ in ((ws, gs, bs), again):  # twice: the norms' fixed order gives equal bits
            lars_step_(w_, g_, b_, lr=lr, momentum=m, weight_decay=wd if adapt else 0.0, trust_coefficient=eta,
                       adapt=adapt, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(ws + bs, again[0] + again[2])), "two runs differ"
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
        for w, b, ww, wb in zip(ws, bs, want_w, want_b):
            torch.testing.assert_close(b.double(), wb, **tol)
            torch.testing.assert_close(w.double(), ww, **tol)


def cases(device: str, quick: bool) -> List[Tuple[str, Callable[[], None]]]:
    loss_sizes = [(1, 7), (3, 1000)] + ([] if quick else [(257, 256), (3, 1), (2, 8192), (4096, 256), (1000, 4097)])
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, D in loss_sizes:
            out.append((f"byol_loss {str(dtype)[6:]} B={B} D={D}",
                        lambda B=B, D=D, dtype=dtype: check_byol_loss(B, D, dtype, device, seed=B * 7 + D)))
    out.append(("normalized_l2_loss strided B=257 D=300",
                lambda: check_pair_loss_non_contiguous(257, 300, device, seed=3)))
    counts = [1, 37] + ([] if quick else [5, 165, 200])
    for t_dtype, o_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                             (torch.float32, torch.bfloat16), (torch.float16, torch.float16)):
        for n in counts:
            for tm in (False, True):
                out.append((f"ema_update_ {str(t_dtype)[6:]}<-{str(o_dtype)[6:]} n={n} tensor_m={tm}",
                            lambda n=n, t=t_dtype, o=o_dtype, tm=tm: check_ema(n, t, o, device, seed=n, tensor_momentum=tm)))
    out.append(("ema_update_ exact 1 - m (float, fp64 tensor)", lambda: check_ema_exact_weight(device)))
    out.append(("ema_update_ bf16 stochastic rounding", lambda: check_ema_stochastic(device)))
    out.append(("ema_update_ = torch.lerp bit for bit (fp32, bf16, fp16)", lambda: check_ema_equals_lerp(device)))
    for B, size in [(3, 9)] + ([] if quick else [(29, 31), (64, 224)]):
        out.append((f"photometric B={B} {size}x{size}", lambda B=B, size=size: check_photometric(B, size, device, seed=B)))
    for dtype in (torch.float32, torch.float64):
        for n in ([2] if quick else [2, 13, 171]):
            out.append((f"lars_step_ {str(dtype)[6:]} n={n}",
                        lambda n=n, dtype=dtype: check_lars(n, dtype, device, seed=n)))
    return out


def run(device: str = "cuda", quick: bool = False, log=print) -> Dict:
    """Every case on ``device``; ``{"device", "cases": [{"name", "ok", "error"}], "failed", "total"}``.

    Under the interpreter the casts and ``tl.fma`` are first given compiled semantics
    (:mod:`._interpreter`): the bit-for-bit cases check the GPU's rounding, not the interpreter's."""
    from ._backend import interpreting

    if not device.startswith("cuda") and interpreting():
        from ._interpreter import use_compiled_semantics

        use_compiled_semantics()
    results = []
    for name, case in cases(device, quick):
        try:
            case()
            results.append({"name": name, "ok": True, "error": None})
            log(f"ok    {name}")
        except AssertionError as e:
            msg = " ".join(str(e).split())[:300]
            results.append({"name": name, "ok": False, "error": msg})
            log(f"FAIL  {name}: {msg}")
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU (interpreter)"
    failed = sum(not r["ok"] for r in results)
    log(f"{failed} of {len(results)} cases failed on {where}")
    return {"device": where, "cases": results, "failed": failed, "total": len(results)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (compiled kernels) or cpu (needs TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="leave out the large sizes (for the interpreter)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("kernel_check: no CUDA device here", file=sys.stderr)
        return 2
    return 1 if run(args.device, args.quick)["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
