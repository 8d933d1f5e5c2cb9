"""Fused photometric augmentation (Triton, under the interpreter) against a float64 reference,
against today's torch path (fastbyol.augment), and its bf16/fp16 rounding bit for bit."""
import itertools

import numpy as np
import pytest
import torch

from fastbyol.augment import augment_view, draw_batch, fused_view, photometric_params
from fastbyol.batch_views import TwoViews
from fastbyol.config import AugmentConfig
from fastbyol_kernels.augment import PARAM_COLUMNS, photometric, photometric_reference
from fastbyol_kernels.launches import augment_blocks

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PERMS = list(itertools.permutations(range(4)))  # every order of brightness, contrast, saturation, hue
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 against float64, after division by std ~0.23


def _params(n, seed, jitter_p=0.85, gray_p=0.3, solarize_p=0.4):
    """A parameter table whose sample k runs order PERMS[k % 24], with random flags and factors."""
    g = torch.Generator().manual_seed(seed)
    u = lambda: torch.rand(n, generator=g)  # noqa: E731
    p = torch.zeros(n, len(PARAM_COLUMNS))
    p[:, 0], p[:, 1] = (u() < 0.5).float(), (u() < jitter_p).float()
    p[:, 2:5] = 0.5 + torch.rand(n, 3, generator=g)  # brightness, contrast, saturation in [0.5, 1.5)
    p[:, 5] = 0.4 * u() - 0.2  # hue shift in turns
    p[::7, 5] = 0.0  # a zero shift is a no-op
    p[:, 6:10] = torch.tensor([PERMS[k % 24] for k in range(n)], dtype=torch.float32)
    p[:, 10], p[:, 11] = (u() < gray_p).float(), (u() < solarize_p).float()
    return p


def _uint8(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    crops = torch.randint(0, 256, (n, 2, 3, h, w), dtype=torch.uint8, generator=g)
    return crops[:, 1]  # a strided view, as the loader's crops[:, 1]


# all 24 orders with blur kernels cut to the image (11 taps > 5 or 7 px); 2 tiles a sample, full
# kernel; the blur's blocks 2 x 3 (28 rows x 32 columns at 5 taps, 42 x 32 at ImageNet's 23)
@pytest.mark.parametrize("n,h,w,k", [(29, 5, 7, 11), (3, 23, 25, 5), (3, 40, 70, 5), (3, 50, 75, 23)])
def test_matches_float64_reference(n, h, w, k):
    x, p = _uint8(n, h, w, seed=n), _params(n, seed=n)
    blur = dict(blurred=np.array([1, n - 1]), sigma=np.array([0.4, 1.7]), kernel_size=k)
    got = photometric(x, p, MEAN, STD, **blur, backend="triton")
    want = photometric_reference(x, p, MEAN, STD, **blur, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (n, 3, h, w)
    torch.testing.assert_close(got.double(), want, **TOL)
    # the fp32 reference (the CPU fallback) agrees too
    torch.testing.assert_close(photometric(x, p, MEAN, STD, **blur, backend="torch").double(), want, **TOL)


def test_float_input_channels_last_no_blur():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 6, 11, generator=g)[:, :, :, 1:]  # float in [0, 1], a column offset
    p = _params(6, seed=3)
    got = photometric(x, p, MEAN, STD, channels_last=True, backend="triton")
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), photometric_reference(x, p, MEAN, STD, compute_dtype=torch.float64, out_dtype=torch.float64), **TOL)


def test_contrast_mean_follows_the_ops_before_it():
    # Brightness 0.5 then contrast 0: the image becomes its grey mean *after* the darkening.
    x = torch.full((2, 3, 4, 5), 200, dtype=torch.uint8)
    x[:, :, :2] = 40
    p = torch.zeros(2, len(PARAM_COLUMNS))
    p[:, 1], p[:, 2], p[:, 3], p[:, 4] = 1, 0.5, 0.0, 1.0
    p[0, 6:10] = torch.tensor([0, 1, 2, 3.])  # brightness first
    p[1, 6:10] = torch.tensor([1, 0, 2, 3.])  # contrast first
    got = photometric(x, p, (0, 0, 0), (1, 1, 1), backend="triton")
    mean = (40 + 200) / 2 / 255
    torch.testing.assert_close(got[0], torch.full_like(got[0], 0.5 * mean))
    torch.testing.assert_close(got[1], torch.full_like(got[1], 0.5 * mean))  # (mean, then halved)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_is_the_fp32_output_rounded_to_nearest_even(out_dtype):
    # One rounding of the kernel's own fp32 values, as torch rounds (needs conftest's compiled
    # cast semantics: the interpreter's own fp32 -> bf16 cast truncates).
    from conftest import COMPILED_SEMANTICS

    assert COMPILED_SEMANTICS
    x, p = _uint8(9, 6, 5, seed=7), _params(9, seed=7)
    kw = dict(blurred=np.array([2, 3]), sigma=np.array([0.7, 1.2]), kernel_size=5, backend="triton")
    high = photometric(x, p, MEAN, STD, **kw)
    low = photometric(x, p, MEAN, STD, out_dtype=out_dtype, channels_last=True, **kw)
    assert low.dtype == out_dtype
    assert torch.equal(low, high.to(out_dtype)), f"{(low != high.to(out_dtype)).sum().item()} values differ"


def _byol(size):
    return AugmentConfig(image_size=size)  # BYOL's two views: blur 1.0 / 0.1, solarise 0 / 0.2


def test_same_views_as_the_torch_path():
    cfg = _byol(6)
    n = 13
    crops = _uint8(n, 6, 6, seed=11)
    for view, d in zip(cfg.views(), draw_batch(n, 6, 6, cfg, seed=5)):
        d.blur[:3] = [True, False, True]  # blurred and not, whatever the view's probability
        torch_path = augment_view(crops, view, cfg, d.to(crops.device))
        fused = fused_view(crops, view, cfg, d, backend="triton")
        torch.testing.assert_close(fused, torch_path, **TOL)


def test_two_views_of_a_tensor_batch_match_the_torch_path():
    cfg = _byol(5)
    images = torch.rand(4, 3, 7, 6, generator=torch.Generator().manual_seed(2))
    keys = (3, 0, range(4))
    fused = TwoViews(cfg, kernels="triton")(images, keys)
    ref = TwoViews(cfg)(images, keys)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_params_follow_the_draws():
    cfg = _byol(8)
    d = draw_batch(5, 8, 8, cfg, seed=1)[1]
    p = photometric_params(d)
    assert p.shape == (5, len(PARAM_COLUMNS)) and p.dtype == np.float32
    np.testing.assert_array_equal(p[:, 6:10], d.order)
    np.testing.assert_array_equal(p[:, 11], d.solarize)


def test_tiles_and_blocks():
    assert augment_blocks(224 * 224) == (512, 98, 4)
    assert augment_blocks(35)[:2] == (64, 1)


def test_errors():
    x, p = _uint8(2, 4, 4, seed=0), _params(2, seed=0)
    with pytest.raises(ValueError, match="params must be"):
        photometric(x, p[:, :5], MEAN, STD)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        photometric(x[:, :2], p, MEAN, STD)
    with pytest.raises(ValueError, match="as many sigmas"):
        photometric(x, p, MEAN, STD, blurred=np.array([0]))
    with pytest.raises(ValueError, match="odd"):
        photometric(x, p, MEAN, STD, blurred=np.array([0]), sigma=np.array([1.0]), kernel_size=4)
    with pytest.raises(ValueError, match="out_dtype"):
        photometric(x, p, MEAN, STD, out_dtype=torch.float64, backend="triton")


def test_host_arrays_reach_the_device_in_one_aligned_buffer():
    from fastbyol_kernels.augment import host_to_device

    parts = [np.arange(7, dtype=np.float32) / 3, np.array([5, -1, 2], dtype=np.int32), np.zeros(0, np.int32)]
    got = host_to_device(parts, torch.device("cpu"))
    assert [g.dtype for g in got] == [torch.float32, torch.int32, torch.int32]
    for g, p in zip(got, parts):
        np.testing.assert_array_equal(g.numpy(), p)
    assert got[0].untyped_storage().data_ptr() == got[1].untyped_storage().data_ptr()  # one copy
    assert all((g.data_ptr() - got[0].data_ptr()) % 16 == 0 for g in got[:2])
