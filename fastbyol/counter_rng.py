"""A counter-based random number generator: uniforms as a pure function of (seed, epoch, index, k).

Every random choice of an image's two views is a function of ``(seed, epoch, index)`` alone
(:func:`fastbyol.augment.draw_samples`), so the choices do not depend on which loader, which
rank, which batch or which thread draws them, and a resumed run replays them. A stateful
generator per image (``default_rng((seed, epoch, i))``) gives that too, but costs ~50 µs per
image to build and draw from; hashing counters is vectorised over a whole batch at once.

The hash is SplitMix64 (Steele, Lea & Flood, 2014; the generator Java's ``SplittableRandom``
and xoshiro's seeding use): ``(seed, epoch, index)`` is folded into one 64-bit key, and draw
``k`` of that key is the SplitMix64 output ``mix(key + (k + 1)·γ)``; its top 53 bits give a
float64 uniform in ``[0, 1)``. It passes BigCrush as a stream; the tests check the moments and
the independence of neighbouring indices and counters.
"""
from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (arithmetic wraps mod 2⁶⁴)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices) -> np.ndarray:
    """One 64-bit key per sample: uint64 ``[n]`` from ``(seed, epoch, index)``."""
    with np.errstate(over="ignore"):
        k = _mix(np.array([seed & _MASK], np.uint64) + _GAMMA)
        k = _mix(k ^ np.array([epoch & _MASK], np.uint64))
        return _mix(k ^ (np.asarray(indices, dtype=np.int64).astype(np.uint64) + _GAMMA))


def counter_uniforms(seed: int, epoch: int, indices, count: int) -> np.ndarray:
    """float64 ``[n, count]`` uniforms in ``[0, 1)``: row ``r`` is sample ``indices[r]``'s
    stream, column ``k`` its ``k``-th draw. A row depends on ``(seed, epoch, index)`` only."""
    keys = sample_keys(seed, epoch, indices)
    with np.errstate(over="ignore"):
        ctr = (np.arange(1, count + 1, dtype=np.uint64) * _GAMMA)[None, :]
        bits = _mix(keys[:, None] + ctr)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


__all__ = ["counter_uniforms", "sample_keys"]
