"""BYOL's two asymmetric views of a float image batch that is already on the training device.

The loaders cut crops on the host while decoding (:mod:`fastbyol.augment`); a caller holding a
tensor batch (byol-pytorch's ``learner(images)``, a user's ``Dataset`` of tensors) gets the
same augmentation here, batched on the images' device: every random choice per image from
:func:`~fastbyol.augment.draw_samples`, both views' random resized crops in one
``grid_sample`` pass (:func:`~fastbyol.augment.crop_resize_batch`), then each view's photometry
(:func:`~fastbyol.augment.photometric_view`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from fastbyol_kernels._backend import use_triton

from .augment import crop_resize_batch, draw_samples, fused_view, photometric_view
from .config import AugmentConfig


class TwoViews:
    """``views(images) -> (view1, view2)`` for float images ``[B, 3, H, W]`` in [0, 1].

    Args:
        cfg: the augmentation (default: BYOL's two views, ImageNet statistics, at 224 px).
        which: ``(0, 1)`` both views; ``(0,)`` or ``(1,)`` only that one (returned alone).
        kernels: the photometric half by the fused Triton kernel (``triton``; ``auto``, the
            default: on CUDA, as training does; :func:`~fastbyol.augment.fused_view`) or by
            the torch ops (``torch``; ``auto`` on a CPU).

    Random choices: ``keys = (seed, epoch, indices)`` gives image ``k`` the choices of sample
    ``indices[k]`` (:func:`~fastbyol.augment.draw_samples`, the loaders' counter-based draws);
    without ``keys``, a 63-bit seed is taken from torch's generator per call (so
    ``torch.manual_seed`` makes the views reproducible), a host-side draw with no device sync.

    Examples:
        >>> views = TwoViews(AugmentConfig(image_size=16))
        >>> v1, v2 = views(torch.rand(4, 3, 20, 24))
        >>> v1.shape, v2.shape
        (torch.Size([4, 3, 16, 16]), torch.Size([4, 3, 16, 16]))
    """

    def __init__(self, cfg: Optional[AugmentConfig] = None, which: Tuple[int, ...] = (0, 1), kernels: str = "auto"):
        self.cfg = cfg or AugmentConfig()
        self.which = tuple(which)
        self.kernels = kernels

    def draws(self, n: int, height: int, width: int, keys: Optional[Tuple[int, int, Sequence[int]]] = None):
        if keys is None:
            base = int(torch.randint(0, 2 ** 63 - 1, ()).item())  # CPU generator: no device sync
            keys = (base, 0, range(n))
        seed, epoch, indices = keys
        return draw_samples(np.asarray(indices, dtype=np.int64), np.full(n, height), np.full(n, width), self.cfg,
                            seed, epoch)

    def __call__(self, images: torch.Tensor, keys: Optional[Tuple[int, int, Sequence[int]]] = None):
        n, _, height, width = images.shape
        draws = self.draws(n, height, width, keys)
        views = self.cfg.views()
        boxes = torch.from_numpy(np.concatenate([draws[v].boxes for v in self.which]))
        x = images if len(self.which) == 1 else images.repeat(len(self.which), 1, 1, 1)
        crops = crop_resize_batch(x, boxes, self.cfg.image_size).chunk(len(self.which))
        if self.kernels != "torch" and use_triton(self.kernels, [images]):
            out = tuple(fused_view(c, views[v], self.cfg, draws[v], images.dtype, backend=self.kernels)
                        for c, v in zip(crops, self.which))
        else:
            out = tuple(photometric_view(c, views[v], self.cfg, draws[v].to(images.device), images.dtype)
                        for c, v in zip(crops, self.which))
        return out if len(out) > 1 else out[0]

    def __repr__(self) -> str:
        return f"TwoViews(image_size={self.cfg.image_size}, views={self.which})"
