"""The DALI pipeline definition of both BYOL views: no random operator inside, every choice is
an input from the feeder (:mod:`fastbyol.data.dali_feeder`); the steps, and where they depart from
torchvision, are listed in :mod:`fastbyol.data.dali`. The same definition runs on the GPU
(``device="mixed"`` decoding) and on DALI's CPU backend (``device_id=None``).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..augment import GRAY_WEIGHTS
from ..config import AugmentConfig, ViewConfig
from ..errors import FastByolError
from .dali_params import VIEW_COLUMNS, view_columns


DALI_MISSING = ("--loader dali needs NVIDIA DALI: pip install 'fastbyol[dali]' "
                "(nvidia-dali-cuda130, or nvidia-dali-cuda120 for CUDA 12)")

_SOLARIZE_AT = 127.5  # x/255 >= 0.5, the torch path's threshold


def import_dali():
    """``(nvidia.dali, fn, types)``, or the install hint as a :class:`FastByolError`."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError:
        raise FastByolError(DALI_MISSING) from None
    return dali, fn, types




def _view(fn, types, image, p: dict, view: ViewConfig, aug: AugmentConfig, out_type, layout: str):
    """One BYOL view of decoded uint8 HWC images; ``p`` holds this view's parameter inputs."""
    s = aug.image_size
    # uint8 out: clipped and rounded as PIL's bicubic (the torch path's crop) is.
    x = fn.resize(image, size=[s, s], roi_start=p["roi_start"], roi_end=p["roi_end"], roi_relative=False,
                  interp_type=types.INTERP_CUBIC, antialias=True)
    if view.jitter_p > 0:
        mean = fn.reductions.mean(x, axes=[0, 1], keep_dims=True, dtype=types.FLOAT)  # [1, 1, 3]
        x = _clamp255(fn.coord_transform(x, M=p["jitter_a"], dtype=types.FLOAT)
                      + fn.coord_transform(mean, M=p["jitter_t"]))
    else:
        x = fn.cast(x, dtype=types.FLOAT)
    gray = np.outer(np.ones(3), GRAY_WEIGHTS).astype(np.float32).ravel().tolist()  # luma into every channel
    if view.grayscale_p >= 1:
        x = fn.coord_transform(x, M=gray)
    elif view.grayscale_p > 0:
        if p["gray"]:
            x = fn.coord_transform(x, M=gray)
    if view.blur_p >= 1:
        x = fn.gaussian_blur(x, sigma=p["sigma"], window_size=p["window"])
    elif view.blur_p > 0:
        if p["blur"]:
            x = fn.gaussian_blur(x, sigma=p["sigma"], window_size=p["window"])
    if view.solarize_p >= 1:
        x = _solarize(x)
    elif view.solarize_p > 0:
        if p["solarize"]:
            x = _solarize(x)
    return fn.crop_mirror_normalize(x, mirror=p["flip"], mean=[255.0 * m for m in aug.mean],
                                    std=[255.0 * sd for sd in aug.std], output_layout=layout, dtype=out_type)


def _solarize(x):
    return x + (x >= _SOLARIZE_AT) * (255.0 - 2.0 * x)


def _clamp255(x):
    from nvidia.dali import math as dmath

    return dmath.clamp(x, 0.0, 255.0)


def byol_two_view_pipeline(source: Callable, aug: AugmentConfig, batch_size: int, *, encoded: bool,
                           device_id: Optional[int] = None, num_threads: int = 2, seed: int = 0,
                           fp16: bool = False, channels_last: bool = False, prefetch_queue_depth: int = 2,
                           jpeg_fancy_upsampling: bool = True):
    """Build the two-view DALI pipeline.

    Args:
        source: batch callable returning the columns ``[images, labels, *view1, *view2]``
            (:func:`view_columns` per view), e.g. a :class:`TwoViewFeeder`.
        aug: augmentation parameters; which ops exist is decided from it once, here.
        batch_size: maximum samples per batch (batches may be smaller).
        encoded: images are encoded files (decoded here) rather than uint8 HWC pixels.
        device_id: CUDA device for GPU mode; ``None`` runs everything on DALI's CPU backend.
        fp16: float16 output instead of float32.
        channels_last: HWC output (a channels-last NCHW tensor once permuted) instead of CHW.
        jpeg_fancy_upsampling: the CPU decoder's (and PIL's) chroma upsampling, so DALI's pixels
            match the torch path's; False may let nvJPEG use the hardware decoder (A100, H100,
            H200), ``gpu-check`` part f measures both.

    Returns:
        A built ``nvidia.dali.Pipeline`` with outputs ``(view1, view2, labels)``.
    """
    dali, fn, types = import_dali()
    dev = "cpu" if device_id is None else "gpu"
    out_type = types.FLOAT16 if fp16 else types.FLOAT
    layout = "HWC" if channels_last else "CHW"
    names = [view_columns(v) for v in aug.views()]
    dtypes = [types.UINT8, types.INT64] + [getattr(types, VIEW_COLUMNS[n]) for ns in names for n in ns]

    @dali.pipeline_def(enable_conditionals=True)
    def two_views():
        cols = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes)
        images, labels = cols[0], cols[1]
        if encoded:
            # GPU: nvJPEG's memory padding and preallocation as DALI's ResNet-50 example, so its
            # buffers are sized once instead of regrown for every larger image.
            hints = dict(device_memory_padding=211025920, host_memory_padding=140544512,
                         preallocate_width_hint=5980, preallocate_height_hint=6430) if dev == "gpu" else {}
            images = fn.decoders.image(images, device="mixed" if dev == "gpu" else "cpu", output_type=types.RGB,
                                       adjust_orientation=False,  # PIL (the torch path) ignores EXIF too
                                       jpeg_fancy_upsampling=jpeg_fancy_upsampling,
                                       **hints)
        else:
            images = fn.reshape(images, layout="HWC")
            if dev == "gpu":
                images = images.gpu()
        views = []
        first = 2
        for view, ns in zip(aug.views(), names):
            p = dict(zip(ns, cols[first:first + len(ns)]))
            first += len(ns)
            views.append(_view(fn, types, images, p, view, aug, out_type, layout))
        return views[0], views[1], labels

    pipe = two_views(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                     seed=seed % (2 ** 31), prefetch_queue_depth=prefetch_queue_depth, exec_dynamic=True)
    pipe.build()
    return pipe
