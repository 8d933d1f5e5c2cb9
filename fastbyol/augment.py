"""BYOL's two asymmetric views (BYOL_SPEC, "Augmentations"), split where it is cheapest.

* Geometry, per image, on the host while decoding: :func:`sample_crop_box` +
  :func:`decode_two_crops` (random resized crop, bicubic, straight from the file).
* Photometry, batched on the training device: :func:`augment_view` applies flip,
  colour jitter (random order), grayscale, Gaussian blur, solarisation and normalisation
  to a whole uint8 batch, every random choice drawn per sample.

The DALI path (:mod:`fastbyol.data.dali`) reads the same :class:`AugmentConfig`.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentConfig, ViewConfig

# ITU-R 601 luma, as torchvision's rgb_to_grayscale and DALI's colour-space conversion.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- geometry (host)

def sample_crop_box(height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                    rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)``: area share in ``scale``, aspect ratio
    log-uniform in ``ratio``; 10 tries, then the largest centred box of legal ratio
    (torchvision's RandomResizedCrop algorithm)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(img, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop a PIL image to ``box`` and resize to ``size``² with bicubic (antialiased)
    filtering in one PIL call; returns uint8 ``[3, size, size]``."""
    from PIL import Image

    top, left, h, w = box
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return np.array(out, dtype=np.uint8).transpose(2, 0, 1)


def two_crops(img, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Both views' random resized crops of one RGB PIL image: uint8 ``[2, 3, S, S]``."""
    width, height = img.size
    boxes = [sample_crop_box(height, width, cfg.crop_scale, cfg.crop_ratio, rng) for _ in range(2)]
    return np.stack([crop_resize(img, b, cfg.image_size) for b in boxes])


def center_view(img, size: int) -> np.ndarray:
    """The evaluation view: resize the short side to size·8/7 (256 for 224), centre-crop
    ``size``; images already at ``size`` (CIFAR) pass unchanged. uint8 ``[3, S, S]``."""
    width, height = img.size
    if (width, height) == (size, size):
        return np.array(img, dtype=np.uint8).transpose(2, 0, 1)
    short = size * 8 // 7 if size >= 64 else size
    s = short / min(width, height)
    cw, ch = size / s, size / s
    left, top = (width - cw) / 2, (height - ch) / 2
    from PIL import Image

    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return np.array(out, dtype=np.uint8).transpose(2, 0, 1)


# ----------------------------------------------------------------------------- photometry (device)

def _rand(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, g, device)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of ``[B, 3, H, W]`` as ``[B, 1, H, W]``."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), f)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).expand_as(x), f)


def apply_where(mask: torch.Tensor, op, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``op(x, factor)`` for the samples in ``mask``, the others unchanged.

    On CUDA the op runs on the whole batch and ``torch.where`` keeps the masked samples:
    selecting a data-dependent subset would sync with the host. On CPU there is nothing to
    sync with, so only the selected samples are computed (colour jitter's four stages
    would otherwise run the costly hue round trip on every sample four times, and view 2
    would blur every sample to keep 10%). Both give the same values; the tests compare them.
    """
    if x.device.type == "cpu":
        idx = mask.nonzero().squeeze(1)
        if idx.numel():
            x = x.index_copy(0, idx, op(x.index_select(0, idx), factor.index_select(0, idx)))
        return x
    return torch.where(_per_sample(mask), op(x, factor), x)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = (
        torch.stack((v, t, p), 1), torch.stack((q, v, p), 1), torch.stack((p, v, t), 1),
        torch.stack((p, q, v), 1), torch.stack((t, p, v), 1), torch.stack((v, p, q), 1),
    )
    out = choices[0]
    for k in range(1, 6):
        out = torch.where((i == k).unsqueeze(1), choices[k], out)
    return out


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample; 0 leaves the sample unchanged)."""
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    out = hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))
    return torch.where(_per_sample(shift != 0), out, x)


def color_jitter(x: torch.Tensor, view: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each sample in its own random order,
    applied to a ``jitter_p`` share of samples (torchvision ColorJitter semantics)."""
    n, dev = x.shape[0], x.device
    apply = _rand(n, g, dev) < view.jitter_p
    ops = (_brightness, _contrast, _saturation, adjust_hue)
    factors = (
        _uniform(n, 1 - view.brightness, 1 + view.brightness, g, dev),
        _uniform(n, 1 - view.contrast, 1 + view.contrast, g, dev),
        _uniform(n, 1 - view.saturation, 1 + view.saturation, g, dev),
        _uniform(n, -view.hue, view.hue, g, dev),
    )
    order = torch.argsort(torch.rand(n, 4, generator=g, device=dev), dim=1)
    for stage in range(4):
        for k, op in enumerate(ops):
            if k == 3 and view.hue == 0:
                continue
            x = apply_where(apply & (order[:, stage] == k), op, x, factors[k])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` ([B]), reflect padding."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(pos.view(1, -1) ** 2) / (2 * sigma.view(-1, 1).to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    pad_h, pad_w = min(half, h - 1), min(half, w - 1)
    y = x.reshape(1, n * c, h, w)
    if pad_h < half or pad_w < half:  # image smaller than the kernel: trim the kernel
        k_h = k[:, half - pad_h: half + pad_h + 1]
        k_w = k[:, half - pad_w: half + pad_w + 1]
        k_h, k_w = k_h / k_h.sum(1, keepdim=True), k_w / k_w.sum(1, keepdim=True)
    else:
        k_h = k_w = k
    y = F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect")
    y = F.conv2d(y, k_w.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect")
    y = F.conv2d(y, k_h.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def augment_view(x: torch.Tensor, view: ViewConfig, cfg: AugmentConfig, g: torch.Generator,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Photometric half of one BYOL view, batched, every choice per sample.

    Args:
        x: uint8 ``[B, 3, S, S]`` crops, on the training device.
        view: the view's probabilities (``cfg.view1`` or ``cfg.view2``).
        g: a generator on ``x.device``; the result is a function of its state.

    Returns:
        Normalised ``[B, 3, S, S]`` tensor of ``out_dtype``.
    """
    n, dev = x.shape[0], x.device
    x = x.float().div_(255.0)
    flip = _rand(n, g, dev) < view.flip_p
    x = torch.where(_per_sample(flip), x.flip(3), x)
    if view.jitter_p > 0:
        x = color_jitter(x, view, g)
    gray = _rand(n, g, dev) < view.grayscale_p
    x = torch.where(_per_sample(gray), grayscale(x).expand_as(x), x)
    if view.blur_p > 0:
        blur = _rand(n, g, dev) < view.blur_p
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], g, dev)
        x = apply_where(blur, lambda xs, s: gaussian_blur(xs, s, cfg.blur_kernel_size), x, sigma)
    if view.solarize_p > 0:
        sol = _rand(n, g, dev) < view.solarize_p
        x = torch.where(_per_sample(sol) & (x >= 0.5), 1.0 - x, x)
    x = normalize(x, cfg)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(out_dtype)


def normalize(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """``(x - mean) / std`` per channel, for float images in [0, 1]."""
    mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_pair(crops: torch.Tensor, cfg: AugmentConfig, g: torch.Generator,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both views from uint8 crops ``[B, 2, 3, S, S]`` (view 1 crop, view 2 crop)."""
    return (augment_view(crops[:, 0], cfg.view1, cfg, g, out_dtype, channels_last),
            augment_view(crops[:, 1], cfg.view2, cfg, g, out_dtype, channels_last))


def step_generator(device: torch.device, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The augmentation generator for one training step: a pure function of
    (seed, step, rank), so resuming at step k replays exactly the same views."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 63 - 1))
    return g


def unnormalize(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Inverse of :func:`normalize` (tests, previews)."""
    mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * std + mean


__all__ = [
    "sample_crop_box", "crop_resize", "two_crops", "center_view", "augment_view", "augment_pair",
    "color_jitter", "gaussian_blur", "grayscale", "adjust_hue", "normalize", "unnormalize", "step_generator",
]
