"""BYOL's two asymmetric views (BYOL_SPEC, "Augmentations"), split where it is cheapest.

* The random choices, per image, on the host: :func:`draw_samples` draws both views' crop
  boxes and every photometric choice for a whole batch at once from a counter-based generator
  keyed by ``(seed, epoch, index)`` (:mod:`fastbyol.counter_rng`). Both data paths use these
  draws, so for a given seed the torch and the DALI paths make the same choices for every
  image, whatever the number of ranks, and a resumed run replays them.
* Geometry, per image, on the host while decoding: :func:`crop_resize` (random resized crop,
  bicubic).
* Photometry, batched on the training device: :func:`augment_view` applies flip, colour
  jitter (random order), grayscale, Gaussian blur, solarisation and normalisation to a whole
  uint8 batch, following each sample's draws; :func:`fused_view` does the same with the fused
  Triton kernel where ``train.kernels`` chooses it (CUDA under ``auto``).

The DALI path (:mod:`fastbyol.data.dali`) reads the same :class:`AugmentConfig` and draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastbyol_kernels._backend import use_triton
from fastbyol_kernels.augment import adjust_hue, gaussian_blur, photometric  # hue and blur: the fused kernel's references too

from .config import AugmentConfig, ViewConfig

# ITU-R 601 luma, as torchvision's rgb_to_grayscale and DALI's colour-space conversion.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- geometry (host)

CROP_TRIES = 10  # torchvision RandomResizedCrop's tries before its centred fallback


def crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale: Tuple[float, float],
               ratio: Tuple[float, float]) -> np.ndarray:
    """Random-resized-crop boxes ``[n, 4]`` int64 ``(top, left, h, w)`` for a batch, from
    uniforms ``u`` ``[n, 10, 4]`` (per try: area share, log aspect ratio, top, left).

    torchvision's RandomResizedCrop algorithm, vectorised: area share uniform in ``scale``,
    aspect ratio log-uniform in ``ratio``; the first of 10 tries that fits, else the largest
    centred box of legal ratio.
    """
    hh, ww = np.asarray(heights, np.int64)[:, None], np.asarray(widths, np.int64)[:, None]
    area = (hh * ww).astype(np.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
    top = np.floor(u[..., 2] * (hh - h + 1)).astype(np.int64)
    left = np.floor(u[..., 3] * (ww - w + 1)).astype(np.int64)
    first = fits.argmax(1)
    rows = np.arange(len(u))
    boxes = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], 1)
    # Fallback: the whole image, cut to the nearest legal aspect ratio, centred.
    hh, ww = hh[:, 0], ww[:, 0]
    in_ratio = ww / hh
    fw = np.where(in_ratio < ratio[0], ww, np.where(in_ratio > ratio[1], np.round(hh * ratio[1]), ww)).astype(np.int64)
    fh = np.where(in_ratio < ratio[0], np.round(ww / ratio[0]), hh).astype(np.int64)
    fallback = np.stack([(hh - fh) // 2, (ww - fw) // 2, fh, fw], 1)
    return np.where(fits.any(1)[:, None], boxes, fallback)


def crop_resize(img, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop a PIL image to ``box`` and resize to ``size``² with bicubic (antialiased)
    filtering in one PIL call; returns uint8 ``[3, size, size]``."""
    from PIL import Image

    top, left, h, w = box
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return np.array(out, dtype=np.uint8).transpose(2, 0, 1)


def crop_resize_batch(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Random resized crops of a float image batch on its own device, in one pass.

    ``x`` is ``[B, C, H, W]``, ``boxes`` ``[B, 4]`` (top, left, h, w) in pixels (as
    :func:`crop_boxes` draws them); returns ``[B, C, size, size]``. Each crop is one affine
    map of ``grid_sample`` (bilinear, ``align_corners=False``: the pixel-centre convention of
    ``F.interpolate``), so a box covering the whole image at its own size returns it unchanged.
    No antialiasing: crops shrunk by more than 2x alias, where PIL's bicubic filter would not.
    """
    n, _, height, width = x.shape
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32  # sample positions in fp32 at least
    top, left, h, w = boxes.to(x.device, dtype).unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=dtype)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- random choices (host)

@dataclass
class ViewDraws:
    """One view's random choices for a batch: numpy arrays over samples (:func:`draw_samples`),
    or tensors on the training device (:meth:`to`)."""

    boxes: np.ndarray  # [n, 4] int (top, left, h, w) of the random resized crop
    flip: np.ndarray  # [n] bool
    jitter: np.ndarray  # [n] bool: colour jitter applied
    factors: np.ndarray  # [n, 4] brightness, contrast, saturation factors, hue shift (turns)
    order: np.ndarray  # [n, 4] the jitter op run at each stage (a permutation of 0..3)
    gray: np.ndarray  # [n] bool
    blur: np.ndarray  # [n] bool
    sigma: np.ndarray  # [n] blur sigma in pixels
    solarize: np.ndarray  # [n] bool

    def take(self, idx) -> "ViewDraws":
        """The draws of samples ``idx`` (an index array or a slice)."""
        return ViewDraws(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: torch.device) -> "ViewDraws":
        """As tensors on ``device`` (floats as float32, the views' compute dtype)."""
        def conv(a):
            t = torch.as_tensor(a)
            return t.to(device, torch.float32 if t.is_floating_point() else t.dtype, non_blocking=True)

        return ViewDraws(**{f.name: conv(getattr(self, f.name)) for f in fields(self)})


# Per view, the uniforms each choice reads (a fixed layout: turning an op off changes no other draw).
_TRY = slice(0, 4 * CROP_TRIES)  # crop tries: area share, log ratio, top, left
_FLIP, _JITTER, _GRAY, _BLUR, _SOLARIZE, _SIGMA = range(4 * CROP_TRIES, 4 * CROP_TRIES + 6)
_FACTORS = slice(4 * CROP_TRIES + 6, 4 * CROP_TRIES + 10)  # brightness, contrast, saturation, hue
_ORDER = slice(4 * CROP_TRIES + 10, 4 * CROP_TRIES + 14)  # sort keys of the four jitter ops
DRAWS_PER_VIEW = 4 * CROP_TRIES + 14


def draw_samples(indices, heights, widths, aug: AugmentConfig, seed: int, epoch: int
                 ) -> Tuple[ViewDraws, ViewDraws]:
    """Both views' random choices for a batch of images: sample ``k`` is image ``indices[k]``
    (``heights[k]`` x ``widths[k]`` pixels), its choices a function of ``(seed, epoch,
    indices[k])`` and its size alone (:func:`fastbyol.counter_rng.counter_uniforms`), whichever
    batch, loader, rank or thread draws them.

    Every probability is tested against its own uniform. Factors are uniform in ``[1 - s, 1 + s]``
    (hue: ``[-h, h]`` turns) as torchvision's ColorJitter; the op order is a uniform permutation
    (the argsort of four uniforms); blur σ is uniform in ``aug.blur_sigma``.
    """
    from .counter_rng import counter_uniforms

    n = len(indices)
    u_all = counter_uniforms(seed, epoch, indices, 2 * DRAWS_PER_VIEW).reshape(n, 2, DRAWS_PER_VIEW)
    views = []
    for k, v in enumerate(aug.views()):
        u = u_all[:, k]
        f = u[:, _FACTORS]
        spread = np.array([v.brightness, v.contrast, v.saturation, v.hue])
        factors = spread * (2 * f - 1) + np.array([1.0, 1.0, 1.0, 0.0])
        lo, hi = aug.blur_sigma
        views.append(ViewDraws(
            boxes=crop_boxes(u[:, _TRY].reshape(n, CROP_TRIES, 4), heights, widths, aug.crop_scale, aug.crop_ratio),
            flip=u[:, _FLIP] < v.flip_p, jitter=u[:, _JITTER] < v.jitter_p, factors=factors,
            order=np.argsort(u[:, _ORDER], axis=1, kind="stable").astype(np.int64),
            gray=u[:, _GRAY] < v.grayscale_p, blur=u[:, _BLUR] < v.blur_p,
            sigma=lo + (hi - lo) * u[:, _SIGMA], solarize=u[:, _SOLARIZE] < v.solarize_p))
    return views[0], views[1]


def draw_batch(n: int, height: int, width: int, aug: AugmentConfig, seed: int = 0) -> Tuple[ViewDraws, ViewDraws]:
    """Draws for images ``0..n-1`` of one size at epoch 0 (tests, benchmarks)."""
    return draw_samples(np.arange(n), np.full(n, height), np.full(n, width), aug, seed, 0)


def crop_pair(img, box1, box2, size: int) -> np.ndarray:
    """Both views' random resized crops of one RGB PIL image, uint8 ``[2, 3, S, S]``."""
    return np.stack([crop_resize(img, tuple(int(v) for v in b), size) for b in (box1, box2)])


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


def color_jitter(x: torch.Tensor, view: ViewConfig, d: ViewDraws) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each sample in its own order (``d.order``)
    with its own factors (``d.factors``), for the samples with ``d.jitter`` (torchvision
    ColorJitter semantics)."""
    ops = (_brightness, _contrast, _saturation, adjust_hue)
    for stage in range(4):
        for k, op in enumerate(ops):
            if k == 3 and view.hue == 0:
                continue
            x = apply_where(d.jitter & (d.order[:, stage] == k), op, x, d.factors[:, k])
    return x


def augment_view(x: torch.Tensor, view: ViewConfig, cfg: AugmentConfig, d: ViewDraws,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Photometric half of one BYOL view, batched, following each sample's draws.

    Args:
        x: uint8 ``[B, 3, S, S]`` crops, on the training device.
        view: the view's configuration (``cfg.view1`` or ``cfg.view2``).
        d: this view's draws for the batch, as tensors on ``x.device`` (:meth:`ViewDraws.to`).

    Returns:
        Normalised ``[B, 3, S, S]`` tensor of ``out_dtype``.
    """
    return photometric_view(x.float().div_(255.0), view, cfg, d, out_dtype, channels_last)


def photometric_view(x: torch.Tensor, view: ViewConfig, cfg: AugmentConfig, d: ViewDraws,
                     out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """:func:`augment_view` on float images in [0, 1] (``[B, 3, S, S]``, any float dtype)."""
    x = torch.where(_per_sample(d.flip), x.flip(3), x)
    if view.jitter_p > 0:
        x = color_jitter(x, view, d)
    x = torch.where(_per_sample(d.gray), grayscale(x).expand_as(x), x)
    if view.blur_p > 0:
        x = apply_where(d.blur, lambda xs, s: gaussian_blur(xs, s, cfg.blur_kernel_size), x, d.sigma)
    if view.solarize_p > 0:
        x = torch.where(_per_sample(d.solarize) & (x >= 0.5), 1.0 - x, x)
    x = normalize(x, cfg)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(out_dtype)


_CHANNEL_CONSTANTS: dict = {}


def _channel_constants(cfg: AugmentConfig, device: torch.device, dtype: torch.dtype):
    """``(mean, std)`` as ``[1, 3, 1, 1]`` tensors, built once per (values, device, dtype): a
    tensor from Python lists is a blocking host→device copy on a GPU, twice a view per step."""
    key = (tuple(cfg.mean), tuple(cfg.std), device, dtype)
    pair = _CHANNEL_CONSTANTS.get(key)
    if pair is None:
        pair = tuple(torch.tensor(v, device=device, dtype=dtype).view(1, 3, 1, 1) for v in key[:2])
        _CHANNEL_CONSTANTS[key] = pair
    return pair


def normalize(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """``(x - mean) / std`` per channel, for float images in [0, 1]."""
    mean, std = _channel_constants(cfg, x.device, x.dtype)
    return (x - mean) / std


def augment_pair(crops: torch.Tensor, cfg: AugmentConfig, draws: Tuple[ViewDraws, ViewDraws],
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False, backend: str = "torch"
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both views from uint8 crops ``[B, 2, 3, S, S]`` (view 1 crop, view 2 crop) and the two
    views' draws (numpy or tensors; moved to the crops' device). ``backend`` (``train.kernels``):
    ``torch`` runs :func:`augment_view`; ``triton``, or ``auto`` on CUDA, the fused kernel
    (:func:`fused_view`), which gives the same views to fp32 rounding."""
    if backend != "torch" and use_triton(backend, [crops]):
        return (fused_view(crops[:, 0], cfg.view1, cfg, draws[0], out_dtype, channels_last, backend),
                fused_view(crops[:, 1], cfg.view2, cfg, draws[1], out_dtype, channels_last, backend))
    d1, d2 = (d.to(crops.device) for d in draws)
    return (augment_view(crops[:, 0], cfg.view1, cfg, d1, out_dtype, channels_last),
            augment_view(crops[:, 1], cfg.view2, cfg, d2, out_dtype, channels_last))


def photometric_params(d: ViewDraws) -> np.ndarray:
    """One view's draws as the per-sample table of :func:`fastbyol_kernels.augment.photometric`
    (columns ``PARAM_COLUMNS``: flip, jitter, the four factors, the op at each stage, gray,
    solarize), float32 ``[n, 12]`` on the host (one copy to the device)."""
    d = _on_host(d)
    return np.column_stack([d.flip, d.jitter, d.factors, d.order, d.gray, d.solarize]).astype(np.float32)


def _on_host(d: ViewDraws) -> ViewDraws:
    """Numpy draws (tensors on a GPU are read back: a sync; the loaders pass numpy draws)."""
    if not isinstance(d.flip, torch.Tensor):
        return d
    return ViewDraws(**{f.name: getattr(d, f.name).cpu().numpy() for f in fields(d)})


def fused_view(x: torch.Tensor, view: ViewConfig, cfg: AugmentConfig, d: ViewDraws,
               out_dtype: torch.dtype = torch.float32, channels_last: bool = False, backend: str = "auto"
               ) -> torch.Tensor:
    """:func:`augment_view` (uint8 crops) or :func:`photometric_view` (float in [0, 1]) by the
    fused Triton kernel (:func:`fastbyol_kernels.augment.photometric`): one pass over the
    pixels for flip, colour jitter, grayscale, solarisation and normalisation, the blurred
    samples (host-known from the draws: no device sync) blurred in between by two more
    passes (:func:`gaussian_blur`'s blur). Same draws, same order of ops; values equal to the
    torch path's to fp32 rounding."""
    d = _on_host(d)
    blurred = np.flatnonzero(d.blur) if view.blur_p > 0 else None
    sigma = None if blurred is None else d.sigma[blurred]
    return photometric(x, torch.from_numpy(photometric_params(d)), cfg.mean, cfg.std, out_dtype=out_dtype,
                       channels_last=channels_last, blurred=blurred, sigma=sigma,
                       kernel_size=cfg.blur_kernel_size, backend=backend)


def unnormalize(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Inverse of :func:`normalize` (tests, previews)."""
    mean, std = _channel_constants(cfg, x.device, x.dtype)
    return x * std + mean


__all__ = [
    "ViewDraws", "draw_samples", "draw_batch", "crop_boxes", "crop_resize", "crop_pair", "DRAWS_PER_VIEW", "CROP_TRIES",
    "center_view", "augment_view", "photometric_view", "crop_resize_batch",
    "augment_pair", "fused_view", "photometric_params", "color_jitter", "gaussian_blur", "grayscale", "adjust_hue",
    "normalize", "unnormalize",
]
