"""Fused photometric augmentation: BYOL's per-sample colour pipeline in one pass over the pixels.

For each sample ``b`` of a ``[B, 3, H, W]`` batch (uint8, divided by 255, or float in [0, 1]),
following row ``b`` of a parameter table (:data:`PARAM_COLUMNS`):

1. horizontal flip;
2. if ``jitter``: brightness, contrast, saturation and hue (torchvision ColorJitter), op
   ``order[k]`` at stage ``k`` (0 brightness, 1 contrast, 2 saturation, 3 hue), each result
   clamped to [0, 1] (hue excepted); contrast blends towards the mean grey of the image *as
   the ops before it left it*; a hue shift of 0 leaves the sample unchanged;
3. grayscale (ITU-R 601 luma in all three channels);
4. Gaussian blur of the samples in ``blurred`` (σ per sample, ``kernel_size`` taps, reflect
   padding; on an image smaller than the kernel, the taps that fit, renormalised);
5. solarisation (``x >= 0.5 -> 1 - x``);
6. ``(x - mean) / std`` per channel, rounded once to the output dtype.

The Triton path reads each input value twice (a first pass for contrast's grey means) and
writes each output value once; a blurred sample's blocks also read the pixels around them
(the blur's halo), coloured again where they are read: nothing goes through memory in fp32.
Every op computes in fp32: the values match :func:`photometric_reference` (and
``fastbyol.augment.photometric_view``) to fp32 rounding, and a bf16/fp16 output is that fp32
value rounded to nearest even.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ._backend import use_triton
from .launches import AUGMENT_PARAMS, blur_reads_and_flops, photometric_launches

PARAM_COLUMNS = ("flip", "jitter", "brightness", "contrast", "saturation", "hue",
                 "order0", "order1", "order2", "order3", "gray", "solarize")
assert len(PARAM_COLUMNS) == AUGMENT_PARAMS
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- reference

def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(f: torch.Tensor, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (a fraction of a turn, per sample; 0 leaves the sample unchanged):
    an RGB → HSV → RGB round trip, as torchvision's ``adjust_hue``."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i6 = torch.floor(h * 6.0)
    f = h * 6.0 - i6
    i = (i6.long() % 6).unsqueeze(1)
    v = maxc
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    out = table.gather(0, i.unsqueeze(0).expand(1, -1, 3, -1, -1)).squeeze(0)
    return torch.where((shift != 0).view(-1, 1, 1, 1), out, x)


@torch.no_grad()
def photometric_reference(x: torch.Tensor, params: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                          out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                          blurred: Optional[np.ndarray] = None, sigma: Optional[np.ndarray] = None,
                          kernel_size: int = 23, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain PyTorch :func:`photometric` (the CPU fallback), computing in ``compute_dtype``
    (float64 for the tests' reference). Every op runs on the whole batch and ``torch.where``
    keeps each sample's choice."""
    _check(x, params, out_dtype, blurred, sigma, kernel_size)
    col = params.to(x.device, compute_dtype).unbind(1)
    c = dict(zip(PARAM_COLUMNS, col))
    per = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    y = x.to(compute_dtype) / 255 if x.dtype == torch.uint8 else x.to(compute_dtype)
    y = torch.where(per(c["flip"] != 0), y.flip(3), y)
    jitter = c["jitter"] != 0
    for stage in range(4):
        op = c[f"order{stage}"]
        f_b, f_c, f_s = per(c["brightness"]), per(c["contrast"]), per(c["saturation"])
        choices = (lambda z: (f_b * z).clamp(0, 1),
                   lambda z: _blend(f_c, z, _gray(z).mean(dim=(1, 2, 3), keepdim=True)),
                   lambda z: _blend(f_s, z, _gray(z)),
                   lambda z: adjust_hue(z, c["hue"]))
        for k, fn in enumerate(choices):
            y = torch.where(per(jitter & (op == k)), fn(y), y)
    y = torch.where(per(c["gray"] != 0), _gray(y).expand_as(y), y)
    if blurred is not None and len(blurred):
        idx = torch.as_tensor(np.asarray(blurred), dtype=torch.long, device=y.device)
        s = torch.as_tensor(np.asarray(sigma, dtype=np.float64), dtype=compute_dtype, device=y.device)
        y = y.index_copy(0, idx, gaussian_blur(y.index_select(0, idx), s, kernel_size))
    y = torch.where(per(c["solarize"] != 0) & (y >= 0.5), 1 - y, y)
    m = torch.tensor(list(mean), dtype=compute_dtype, device=y.device).view(1, 3, 1, 1)
    sd = torch.tensor(list(std), dtype=compute_dtype, device=y.device).view(1, 3, 1, 1)
    y = (y - m) / sd
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.to(out_dtype)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of ``[n, C, H, W]`` with a per-sample ``sigma`` ([n]), reflect
    padding; an image smaller than the kernel gets the taps that fit, renormalised."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(pos.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*C, K]
    pad_h, pad_w = min(half, h - 1), min(half, w - 1)
    k_h, k_w = k[:, half - pad_h: half + pad_h + 1], k[:, half - pad_w: half + pad_w + 1]
    k_h, k_w = k_h / k_h.sum(1, keepdim=True), k_w / k_w.sum(1, keepdim=True)
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (pad_w, pad_w, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, k_w.reshape(n * c, 1, 1, -1), groups=n * c)
    y = torch.nn.functional.pad(y, (0, 0, pad_h, pad_h), mode="reflect")
    y = torch.nn.functional.conv2d(y, k_h.reshape(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _check(x, params, out_dtype, blurred, sigma, kernel_size) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"photometric: images must be [B, 3, H, W], got {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"photometric: images must be uint8 or floating, got {x.dtype}")
    if tuple(params.shape) != (x.shape[0], len(PARAM_COLUMNS)):
        raise ValueError(f"photometric: params must be [{x.shape[0]}, {len(PARAM_COLUMNS)}] "
                         f"({', '.join(PARAM_COLUMNS)}), got {tuple(params.shape)}")
    if out_dtype not in _OUT_DTYPES + (torch.float64,):
        raise ValueError(f"photometric: out_dtype must be float32, bfloat16, float16 or float64, got {out_dtype}")
    if blurred is not None and len(blurred):
        if sigma is None or len(sigma) != len(blurred):
            raise ValueError(f"photometric: {len(blurred)} samples to blur need as many sigmas, got "
                             f"{None if sigma is None else len(sigma)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"photometric: kernel_size must be a positive odd number, got {kernel_size}")


def photometric_bytes(B: int, size: int, out_bytes: int = 2, in_bytes: int = 1, blurred: int = 0,
                      contrast: Optional[int] = None, kernel_size: int = 23) -> dict:
    """DRAM bytes the Triton path moves for one view of ``B`` images of ``size``² pixels (the
    per-sample table and the grey sums aside), against the floor (read the input once, write the
    output once). ``contrast``: samples whose contrast runs (pass 0 reads those; default all);
    ``blurred``: samples made by pass 2, whose blocks read their halo again (counted as DRAM
    reads: no cache assumed, so this is an upper bound).

    Examples:
        >>> b = photometric_bytes(256, 224)  # nothing blurred: 1.33x the floor
        >>> round(b["total"] / b["floor"], 2)
        1.33
        >>> b = photometric_bytes(256, 224, blurred=256)  # BYOL's view 1: every sample blurred
        >>> round(b["total"] / b["floor"], 2)
        1.92
    """
    values = 3 * size * size
    contrast = B if contrast is None else contrast
    halo_pixels, _ = blur_reads_and_flops(size, size, kernel_size)
    read = in_bytes * (values * (contrast + B - blurred) + 3 * halo_pixels * blurred)
    write = values * out_bytes * B
    return {"read": read, "write": write, "total": read + write, "floor": values * B * (in_bytes + out_bytes)}


# ----------------------------------------------------------------------------- Triton

def host_to_device(parts: Sequence[np.ndarray], device: torch.device) -> list:
    """Host arrays (float32 or int32) on ``device`` in one copy, from pinned memory on CUDA, so the
    copy is queued without waiting for the device (from pageable memory a host-to-device copy
    first synchronises the stream). Each part starts 16-byte aligned; returns them flat, in order."""
    sizes = [int(np.asarray(p).size) for p in parts]
    starts = np.concatenate([[0], np.cumsum([-(-n // 4) * 4 for n in sizes])]).astype(int)
    host = torch.empty(int(starts[-1]), dtype=torch.int32, pin_memory=device.type == "cuda")
    flat = host.numpy()
    for p, n, start in zip(parts, sizes, starts):
        p = np.ascontiguousarray(p).reshape(-1)
        flat[start:start + n] = p.view(np.int32) if p.dtype == np.float32 else p.astype(np.int32)
    dev = host.to(device, non_blocking=True)
    return [dev[start:start + n].view(torch.float32) if np.asarray(p).dtype == np.float32 else dev[start:start + n]
            for p, n, start in zip(parts, sizes, starts)]


def _get_kernel():
    from ._triton_augment import photometric_kernel  # triton is imported only here

    return photometric_kernel


@torch.no_grad()
def photometric(x: torch.Tensor, params: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                out_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                blurred: Optional[np.ndarray] = None, sigma: Optional[np.ndarray] = None, kernel_size: int = 23,
                backend: str = "auto") -> torch.Tensor:
    """Flip, colour jitter in each sample's order, grayscale, (blur,) solarisation and
    normalisation of a batch, per sample (the module docstring gives the order and semantics).

    Args:
        x: ``[B, 3, H, W]`` uint8 (divided by 255 first) or float in [0, 1], any strides.
        params: ``[B, 12]`` per-sample table, columns :data:`PARAM_COLUMNS` (flags are 0/1,
            factors as drawn, ``order0..3`` the op at each stage); any float dtype, moved to
            ``x``'s device (build it on the host and it is one copy).
        mean, std: the normalisation, three floats each.
        out_dtype: float32, bfloat16 or float16 (float64 with the reference only).
        channels_last: the output's memory format.
        blurred: host array of the sample indices to blur between grayscale and solarisation
            (a host array, so nothing is read back from the device to select them).
        sigma: host array, the blur's σ in pixels for each of ``blurred``.
        kernel_size: the blur's taps (odd; BYOL: about a tenth of the image size).
        backend: ``auto`` | ``triton`` | ``torch`` (see the package docstring).

    Returns:
        ``[B, 3, H, W]`` of ``out_dtype``.

    Raises:
        ValueError: shapes, dtypes, a blur list without as many sigmas, an even kernel size, an
            unknown backend.
        RuntimeError: ``backend="triton"`` where the kernel cannot run.
    """
    _check(x, params, out_dtype, blurred, sigma, kernel_size)
    run_kernel = use_triton(backend, [x]) and (backend == "triton" or out_dtype in _OUT_DTYPES)
    if backend == "triton" and out_dtype not in _OUT_DTYPES:
        raise ValueError(f"photometric (triton): out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if not run_kernel or x.shape[0] == 0:
        return photometric_reference(x, params, mean, std, out_dtype=out_dtype, channels_last=channels_last,
                                     blurred=blurred, sigma=sigma, kernel_size=kernel_size)
    B, _, H, W = x.shape
    if x.is_floating_point() and x.dtype not in _OUT_DTYPES:
        x = x.float()  # fp64 input: the kernel reads fp32, bf16, fp16 or uint8
    out = torch.empty(B, 3, H, W, device=x.device, dtype=out_dtype,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    blurred = np.asarray([] if blurred is None else blurred, dtype=np.int64)
    slots_host = np.full(B, -1, dtype=np.int32)
    slots_host[blurred] = np.arange(len(blurred), dtype=np.int32)
    sigma_host = np.asarray([] if sigma is None else sigma, dtype=np.float32).reshape(-1)[:len(blurred)]
    host = [blurred.astype(np.int32), slots_host, sigma_host]
    if params.device.type == "cpu":
        params, rows, slots, sigma_dev = host_to_device([params.detach().to(torch.float32).numpy()] + host, x.device)
        params = params.view(B, len(PARAM_COLUMNS))
    else:
        params = params.to(x.device, torch.float32).contiguous()
        rows, slots, sigma_dev = host_to_device(host, x.device)
    kernel = _get_kernel()
    for launch in photometric_launches(x, params, out, slots, rows, sigma_dev, mean, std, kernel_size):
        launch.run(kernel)
    return out
