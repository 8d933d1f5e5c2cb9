"""The DALI pipeline's parameter inputs, from the per-sample draws both paths share
(:func:`fastbyol.augment.draw_samples`); pure numpy, no DALI.

:func:`dali_columns` turns one view's draws for a batch into the pipeline's inputs
(:data:`VIEW_COLUMNS`), composing the four colour-jitter ops in each sample's random order into
one affine colour transform (:func:`jitter_matrices`).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

from ..augment import GRAY_WEIGHTS, ViewDraws
from ..config import ViewConfig

# Per-view parameter inputs of the pipeline (name: DALI type name); a view feeds the subset its
# configuration uses (:func:`view_columns`), after the image and label columns.
VIEW_COLUMNS = {"roi_start": "FLOAT", "roi_end": "FLOAT", "flip": "INT32", "jitter_a": "FLOAT", "jitter_t": "FLOAT",
                "gray": "BOOL", "blur": "BOOL", "sigma": "FLOAT", "window": "INT32", "solarize": "BOOL"}
_GRAY = np.asarray(GRAY_WEIGHTS, dtype=np.float64)


def hue_rotation(shift: np.ndarray) -> np.ndarray:
    """Rotation of RGB about the grey axis by ``shift`` turns: ``[n] → [n, 3, 3]``.

    Keeps grey pixels grey and the channel mean; ``shift = 1/3`` maps R→G→B exactly as an HSV
    hue shift does (Rodrigues' formula with the unit axis (1, 1, 1)/√3).
    """
    theta = 2 * np.pi * np.asarray(shift, dtype=np.float64)
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    k = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return c * np.eye(3) + s * cross + (1 - c) * np.outer(k, k)


def jitter_matrices(factors: np.ndarray, order: np.ndarray, apply: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Compose brightness, contrast, saturation and hue, each sample in its own order, into
    ``y = A·x + T·m`` (``x`` a pixel's RGB, ``m`` the crop's mean RGB), before clamping.

    Args:
        factors: ``[n, 4]`` brightness, contrast, saturation factors and hue shift (turns).
        order: ``[n, 4]`` a permutation of (0, 1, 2, 3) per sample: the op run at each stage.
        apply: ``[n]`` bool; samples without jitter get ``A = I, T = 0``.

    Returns:
        ``A, T``: float32 ``[n, 3, 3]`` each.
    """
    n = len(factors)
    eye, gray = np.eye(3), np.outer(np.ones(3), _GRAY)  # 1·wᵀ: luma in every channel
    f = factors[:, :, None, None]
    # Each op acts linearly on the stacked pair [A; T] (6 x 3): brightness and saturation scale
    # or mix A and T alike; hue rotates both; contrast blends toward the current image's mean
    # luma, wᵀ(A + T)·m, so it feeds A into T: [[cI, 0], [(1 - c)G, cI + (1 - c)G]].
    ops = np.zeros((n, 4, 6, 6))
    for k, m in enumerate((f[:, 0] * eye, None, f[:, 2] * eye + (1 - f[:, 2]) * gray, hue_rotation(factors[:, 3]))):
        if m is not None:
            ops[:, k, :3, :3] = ops[:, k, 3:, 3:] = m
    c = f[:, 1]
    ops[:, 1, :3, :3] = c * eye
    ops[:, 1, 3:, :3] = (1 - c) * gray
    ops[:, 1, 3:, 3:] = c * eye + (1 - c) * gray
    rows = np.arange(n)
    at = np.broadcast_to(np.vstack([eye, np.zeros((3, 3))]), (n, 6, 3))
    for stage in range(4):
        at = ops[rows, order[:, stage]] @ at
    a, t = at[:, :3].copy(), at[:, 3:].copy()
    keep = ~np.asarray(apply, dtype=bool)
    a[keep], t[keep] = np.eye(3), 0.0
    return a.astype(np.float32), t.astype(np.float32)


def view_columns(view: ViewConfig) -> Tuple[str, ...]:
    """The parameter inputs one view's ops read: ops with probability 0 are not built, ops
    with probability 1 need no predicate."""
    names = ["roi_start", "roi_end", "flip"]
    if view.jitter_p > 0:
        names += ["jitter_a", "jitter_t"]
    if 0 < view.grayscale_p < 1:
        names.append("gray")
    if 0 < view.blur_p < 1:
        names.append("blur")
    if view.blur_p > 0:
        names += ["sigma", "window"]
    if 0 < view.solarize_p < 1:
        names.append("solarize")
    return tuple(names)


def dali_columns(d: ViewDraws, names: Sequence[str], kernel_size: int) -> List[List[np.ndarray]]:
    """The pipeline inputs ``names`` (see :func:`view_columns`) of one view's draws: one
    array per column, the batch its outer dimension (no per-sample arrays to build)."""
    top, left, h, w = (d.boxes[:, k].astype(np.float32) for k in range(4))
    cols = {"roi_start": np.stack([top, left], 1), "roi_end": np.stack([top + h, left + w], 1),
            "flip": d.flip.astype(np.int32), "gray": d.gray, "blur": d.blur,
            "sigma": d.sigma.astype(np.float32), "window": blur_window(d.sigma, kernel_size),
            "solarize": d.solarize}
    if "jitter_a" in names:
        cols["jitter_a"], cols["jitter_t"] = jitter_matrices(d.factors, d.order, d.jitter)
    return [np.ascontiguousarray(cols[n]) for n in names]


def blur_window(sigma: np.ndarray, kernel_size: int) -> np.ndarray:
    """Per-sample blur window: ``kernel_size`` (the torch path's), cut to ±4σ where that is
    narrower. The weights cut off are below 3.4e-4 of the peak (6e-5 of the kernel's mass, a
    few hundredths of a grey level), and the convolution costs ~2x less at σ ~ U(0.1, 2)."""
    half = np.minimum(np.ceil(4 * np.asarray(sigma)), kernel_size // 2)
    return (2 * half + 1).astype(np.int32)
