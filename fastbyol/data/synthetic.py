"""The embedded default data set: procedural textures, written once as JPEG class folders.

``fastbyol train`` with no ``--data`` trains on it, with no download. Eight classes are
defined by an image's *structure* (horizontal or vertical stripes, checks, cross-hatch,
rings, dots, blobs, noise); its colours are random fields that change every few pixels
(so two crops of one image rarely share colours; constant colours per image would teach
BYOL a colour shortcut), and frequency, phase, contrast and brightness vary too. The
background is the complement of the foreground colour, so the structure is always
visible. Measured on the 2-core CPU box (README): a random-init ConvNet4 reaches ~60%
kNN top-1 (chance 12.5%), the BYOL-trained one ~90% after ~100 s.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict

import numpy as np

from .image_source import cache_root

VERSION = 2
SIZE = 32
FREQ = (5.0, 7.0)  # pattern cycles per image side


def _grid(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def _smooth_colour_field(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """An RGB field [size, size, 3] in [0, 1]: random colours on a ``cells``² grid, bilinearly
    interpolated, so two crops of one image rarely share their colours."""
    grid = rng.uniform(0, 1, size=(cells + 1, cells + 1, 3)).astype(np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(t.astype(int), cells - 1)
    f = (t - i)[:, None, None]
    rows = grid[i] * (1 - f) + grid[i + 1] * f  # [size, cells+1, 3]
    fx = (t - i)[None, :, None]
    return rows[:, i] * (1 - fx) + rows[:, i + 1] * fx


def _stripes_h(x, y, f, ph, rng):
    return np.sin(2 * np.pi * (f * y + ph))


def _stripes_v(x, y, f, ph, rng):
    return np.sin(2 * np.pi * (f * x + ph))


def _checks(x, y, f, ph, rng):
    return np.sin(2 * np.pi * (f * x + ph)) * np.sin(2 * np.pi * (f * y + ph))


def _crosshatch(x, y, f, ph, rng):
    return np.maximum(np.sin(2 * np.pi * (f * (x + y) / 1.4 + ph)), np.sin(2 * np.pi * (f * (x - y) / 1.4 + ph)))


def _rings(x, y, f, ph, rng):
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    return np.sin(2 * np.pi * (f * np.hypot(x - cx, y - cy) + ph))


def _dots(x, y, f, ph, rng):
    d = np.hypot((f * x + ph) % 1 - 0.5, (f * y + ph) % 1 - 0.5)
    return np.where(d < 0.25, 1.0, -1.0)


def _blobs(x, y, f, ph, rng):
    out = np.zeros_like(x)
    for _ in range(3):
        kx, ky = rng.normal(0, 2.0, size=2)
        out += np.sin(2 * np.pi * (kx * x + ky * y) + rng.uniform(0, 2 * np.pi))
    return out / 3


def _noise(x, y, f, ph, rng):
    return rng.uniform(-1, 1, size=x.shape).astype(np.float32)


PATTERNS: Dict[str, Callable] = {
    "stripes_h": _stripes_h, "stripes_v": _stripes_v, "checks": _checks, "crosshatch": _crosshatch,
    "rings": _rings, "dots": _dots, "blobs": _blobs, "noise": _noise,
}


def make_image(pattern: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One uint8 [size, size, 3] image of a class pattern with random nuisances."""
    x, y = _grid(size)
    f = rng.uniform(FREQ[0], FREQ[1])
    m = PATTERNS[pattern](x, y, f, rng.uniform(0, 1), rng).astype(np.float32)
    m = (m - m.min()) / max(1e-6, float(m.max() - m.min()))  # [0, 1]
    contrast = rng.uniform(0.6, 1.0)
    m = 0.5 + contrast * (m - 0.5)
    fg = _smooth_colour_field(rng, size)
    bg = 1.0 - fg  # complementary colours: the pattern always stands out, whatever the colours
    img = m[..., None] * fg + (1 - m[..., None]) * bg
    img = img * rng.uniform(0.6, 1.2) + rng.normal(0, 0.03, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def default_cache_dir() -> str:
    return os.path.join(cache_root(), f"textures-v{VERSION}")


def ensure_default_dataset(cache_dir: str | None = None, train_per_class: int = 320, val_per_class: int = 80,
                           seed: int = 0) -> Dict[str, str]:
    """Write the texture set once (``train/<class>/*.jpg``, ``val/<class>/*.jpg``) and return
    ``{"train": path, "val": path}``. A finished set is marked by ``done.json`` and reused."""
    from PIL import Image

    root = cache_dir or default_cache_dir()
    marker = os.path.join(root, "done.json")
    spec = {"version": VERSION, "train": train_per_class, "val": val_per_class, "seed": seed, "size": SIZE}
    if os.path.isfile(marker):
        with open(marker) as fh:
            if json.load(fh) == spec:
                return {"train": os.path.join(root, "train"), "val": os.path.join(root, "val")}
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name in PATTERNS:
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.fromarray(make_image(name, rng)).save(os.path.join(d, f"{i:05d}.jpg"), quality=95)
    tmp = marker + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(spec, fh)
    os.replace(tmp, marker)
    return {"train": os.path.join(root, "train"), "val": os.path.join(root, "val")}
