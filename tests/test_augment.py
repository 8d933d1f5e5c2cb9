"""The paper's two views: per-sample randomness and per-view frequencies (BYOL_SPEC table)."""
import numpy as np
import pytest
import torch

from fastbyol.augment import (DRAWS_PER_VIEW, augment_pair, augment_view, crop_boxes, crop_pair, draw_batch,
                              draw_samples, gaussian_blur, unnormalize)
from fastbyol.config import AugmentConfig, ViewConfig, preset

N = 2000  # samples per frequency estimate: binomial std <= 0.011
TOL = 0.045


def only(**kw):
    """A view with every op off except the ones named."""
    base = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    base.update(kw)
    return ViewConfig(**base)


def _raw(view, x, seed=0, cfg=None):
    """``view`` applied to the batch ``x`` with draws made for it (as view 1 of ``cfg``)."""
    cfg = cfg or AugmentConfig(image_size=x.shape[-1])
    cfg = AugmentConfig(**{**cfg.__dict__, "view1": view})
    draws = draw_batch(x.shape[0], x.shape[-2], x.shape[-1], cfg, seed)[0]
    out = augment_view(x, view, cfg, draws.to(x.device))
    return unnormalize(out, cfg)


def _const(rgb, n=N, size=6):
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()


def test_output_shape_dtype_and_normalisation():
    cfg = AugmentConfig(image_size=16)
    crops = torch.randint(0, 256, (64, 2, 3, 16, 16), dtype=torch.uint8)
    v1, v2 = augment_pair(crops, cfg, draw_batch(64, 16, 16, cfg))
    assert v1.shape == v2.shape == (64, 3, 16, 16) and v1.dtype == torch.float32
    for v in (v1, v2):
        raw = unnormalize(v, cfg)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert not torch.allclose(v1, v2)
    # A plain normalisation of mid-grey gives (0.5 - mean) / std.
    mid = _raw(only(), _const((128, 128, 128), 2))
    torch.testing.assert_close(mid, torch.full_like(mid, 128 / 255), rtol=0, atol=1e-6)


def test_flip_frequency_and_per_sample():
    ramp = torch.arange(6, dtype=torch.uint8).mul(40).view(1, 1, 1, 6).expand(N, 3, 6, 6).contiguous()
    out = _raw(only(flip_p=0.5), ramp)
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).float()
    assert abs(flipped.mean().item() - 0.5) < TOL
    assert 0 < flipped[:32].sum() < 32  # drawn per sample, not once per batch


@pytest.mark.parametrize("view_name", ["view1", "view2"])
def test_paper_view_frequencies(view_name):
    """Each op of the paper's views at its own rate: solarise 0 / 0.2, grayscale 0.2, blur 1 / 0.1."""
    # sigma >= 1 so that every blurred checkerboard visibly changes (sigma 0.1 is a no-op).
    cfg = AugmentConfig(image_size=6, blur_sigma=(1.0, 2.0))
    view = getattr(cfg, view_name)
    sol = _raw(only(solarize_p=view.solarize_p), _const((191, 191, 191)), cfg=cfg)
    sol_rate = (sol[:, 0, 0, 0] < 0.5).float().mean().item()
    gray = _raw(only(grayscale_p=view.grayscale_p), _const((255, 0, 0)), cfg=cfg)
    gray_rate = (gray[:, 1, 0, 0] > 0.1).float().mean().item()
    checker = (torch.arange(6).view(1, 6) + torch.arange(6).view(6, 1)) % 2 * 255
    checker = checker.to(torch.uint8).view(1, 1, 6, 6).expand(N, 3, 6, 6).contiguous()
    blur = _raw(only(blur_p=view.blur_p), checker, cfg=cfg)
    blur_rate = ((blur - checker.float() / 255).abs().amax((1, 2, 3)) > 0.05).float().mean().item()
    expected = {"view1": (0.0, 0.2, 1.0), "view2": (0.2, 0.2, 0.1)}[view_name]
    assert sol_rate == pytest.approx(expected[0], abs=TOL)
    assert gray_rate == pytest.approx(expected[1], abs=TOL)
    assert blur_rate == pytest.approx(expected[2], abs=TOL)


def test_jitter_frequency_and_ranges():
    v = only(jitter_p=0.8, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    out = _raw(v, _const((100, 100, 100)))
    factor = out[:, 0, 0, 0] / (100 / 255)
    changed = (factor - 1).abs() > 1e-4
    assert changed.float().mean().item() == pytest.approx(0.8, abs=TOL)
    assert factor.min() >= 0.6 - 1e-4 and factor.max() <= 1.4 + 1e-4
    assert factor[changed].std() > 0.15  # per-sample factors, uniform on [0.6, 1.4] (std 0.23)


def test_hue_rotation_keeps_gray_and_moves_colour():
    v = only(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1)
    gray = _raw(v, _const((90, 90, 90), 64))
    torch.testing.assert_close(gray, torch.full_like(gray, 90 / 255), atol=1e-5, rtol=0)
    red = _raw(v, _const((200, 30, 30), 64))
    assert (red[:, 1] - red[:, 2]).abs().amax() > 0.05  # hue moved off pure red for some samples


def test_views_are_a_function_of_each_images_draws():
    """A sample's views depend on its own draws only: not on the seed of other samples, nor on
    which batch (or rank) it lands in."""
    crops = torch.randint(0, 256, (8, 2, 3, 8, 8), dtype=torch.uint8)
    cfg = AugmentConfig(image_size=8)
    a = augment_pair(crops, cfg, draw_batch(8, 8, 8, cfg, seed=3))
    b = augment_pair(crops, cfg, draw_batch(8, 8, 8, cfg, seed=3))
    c = augment_pair(crops, cfg, draw_batch(8, 8, 8, cfg, seed=4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    d1, d2 = draw_batch(8, 8, 8, cfg, seed=3)
    half = [type(d)(**{k: v[4:] for k, v in d.__dict__.items()}) for d in (d1, d2)]
    tail = augment_pair(crops[4:], cfg, half)  # the same samples, alone in a smaller batch
    assert torch.equal(tail[0], a[0][4:]) and torch.equal(tail[1], a[1][4:])


def test_draws_layout_does_not_depend_on_the_configuration():
    """Each probability has its own uniform draw: switching one op off changes no other choice."""
    paper = AugmentConfig()
    no_flip = AugmentConfig(view1=ViewConfig(flip_p=0.0), view2=ViewConfig(flip_p=0.0, blur_p=0.1, solarize_p=0.2))
    a = draw_samples(np.arange(64), np.full(64, 40), np.full(64, 50), paper, 5, 0)
    b = draw_samples(np.arange(64), np.full(64, 40), np.full(64, 50), no_flip, 5, 0)
    for va, vb in zip(a, b):
        assert np.array_equal(va.boxes, vb.boxes) and not vb.flip.any() and va.flip.any()
        for name in ("jitter", "factors", "order", "gray", "sigma"):
            assert np.array_equal(getattr(va, name), getattr(vb, name)), name
    assert np.array_equal(a[0].blur, b[0].blur) and np.array_equal(a[0].solarize, b[0].solarize)


def test_draws_are_a_function_of_seed_epoch_and_index_alone():
    """Whichever batch (or rank, or loader) draws image i, with whichever neighbours, it gets the
    same choices; another epoch or seed gives others."""
    cfg = AugmentConfig()
    idx = np.array([7, 3, 11, 0, 5])
    h, w = np.array([40, 50, 60, 70, 80]), np.array([90, 50, 40, 70, 33])
    whole = draw_samples(idx, h, w, cfg, 2, 4)
    for k in range(len(idx)):
        alone = draw_samples(idx[k:k + 1], h[k:k + 1], w[k:k + 1], cfg, 2, 4)
        for a, b in zip(whole, alone):
            for name in a.__dataclass_fields__:
                assert np.array_equal(getattr(a, name)[k:k + 1], getattr(b, name)), name
    other_epoch, other_seed = draw_samples(idx, h, w, cfg, 2, 5), draw_samples(idx, h, w, cfg, 3, 4)
    assert not np.array_equal(whole[0].boxes, other_epoch[0].boxes)
    assert not np.array_equal(whole[0].factors, other_seed[0].factors)


def test_counter_uniforms_are_uniform_and_independent():
    from fastbyol.counter_rng import counter_uniforms

    u = counter_uniforms(0, 0, np.arange(4000), 2 * DRAWS_PER_VIEW)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 0.09 * u.size
    c = np.corrcoef(np.stack([u[:-1, 0], u[1:, 0], u[:-1, 1], u[:-1, 2]]))  # neighbouring indices, counters
    assert np.abs(c[np.triu_indices(4, 1)]).max() < 0.05
    perms = draw_batch(4000, 32, 32, AugmentConfig())[0].order
    counts = np.unique(perms, axis=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 4000 / 24 * 0.7  # every jitter order, about equally often


def test_gaussian_blur_matches_dense_reference():
    x = torch.rand(3, 3, 9, 11, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    out = gaussian_blur(x, sigma, 5)
    for i in range(3):
        pos = torch.arange(-2, 3, dtype=torch.float64)
        k = torch.exp(-pos ** 2 / (2 * sigma[i] ** 2))
        k = k / k.sum()
        padded = torch.nn.functional.pad(x[i: i + 1], (2, 2, 2, 2), mode="reflect")
        ref = torch.nn.functional.conv2d(padded, (k.view(-1, 1) * k.view(1, -1)).expand(3, 1, 5, 5), groups=3)
        torch.testing.assert_close(out[i], ref[0])
    torch.testing.assert_close(out.sum((2, 3)), x.sum((2, 3)), rtol=0.05, atol=0)


def test_crop_box_scale_and_ratio():
    rng = np.random.default_rng(0)
    n = 2000
    top, left, h, w = crop_boxes(rng.random((n, 10, 4)), np.full(n, 375), np.full(n, 500),
                                 (0.08, 1.0), (3 / 4, 4 / 3)).T
    assert (top >= 0).all() and (top + h <= 375).all() and (left >= 0).all() and (left + w <= 500).all()
    areas, ratios = h * w / (375 * 500), w / h
    assert 0.07 <= areas.min() and areas.max() <= 1.0 and 0.35 < areas.mean() < 0.55  # rejection of oversize boxes lowers it from 0.54
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34
    # No try fits (uniforms asking for the whole area at an extreme ratio): the centred fallback.
    u = np.zeros((3, 10, 4))
    u[..., 0] = 1.0
    boxes = crop_boxes(u, np.array([10, 100, 50]), np.array([100, 10, 50]), (1.0, 1.0), (3 / 4, 4 / 3))
    assert boxes.tolist() == [[0, 43, 10, 13], [43, 0, 13, 10], [0, 0, 50, 50]]  # cut to ratio 4:3 / 3:4, or whole


def test_two_crops_differ_and_have_the_configured_size():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    v1, v2 = draw_samples([0], [40], [50], preset("smoke").augment, 1, 0)
    assert not np.array_equal(v1.boxes, v2.boxes)
    crops = crop_pair(img, v1.boxes[0], v2.boxes[0], 16)
    assert crops.shape == (2, 3, 16, 16) and crops.dtype == np.uint8
    assert not np.array_equal(crops[0], crops[1])


def test_color_jitter_matches_torchvision_per_sample():
    """Each sample: the ops in its own drawn order, with its own factors, exactly as
    torchvision's functional ops apply them."""
    import torchvision.transforms.functional as TF

    from fastbyol.augment import color_jitter

    n = 24
    x = torch.rand(n, 3, 5, 7)
    cfg = AugmentConfig(image_size=7)
    view = cfg.view1
    d = draw_batch(n, 5, 7, cfg, seed=7)[0]
    out = color_jitter(x, view, d.to(x.device))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    assert 0 < d.jitter.sum() < n and len({tuple(o) for o in d.order.tolist()}) > 3
    lo = np.array([1 - view.brightness, 1 - view.contrast, 1 - view.saturation, -view.hue])
    hi = np.array([1 + view.brightness, 1 + view.contrast, 1 + view.saturation, view.hue])
    assert (d.factors >= lo).all() and (d.factors <= hi).all()
    for i in range(n):
        ref = x[i]
        if d.jitter[i]:
            for k in d.order[i].tolist():
                ref = ops[k](ref, float(np.float32(d.factors[i, k])))
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)  # fp32 HSV round trips; 1/255 = 4e-3


def test_masked_ops_give_the_same_views_on_the_cuda_strategy(monkeypatch):
    """The CPU path computes each jitter op on the selected samples only; the CUDA path
    computes it on all and keeps the selected ones (no host sync). Same values."""
    import fastbyol.augment as A

    crops = torch.randint(0, 256, (32, 2, 3, 9, 9), dtype=torch.uint8)
    cfg = AugmentConfig(image_size=9)
    draws = draw_batch(32, 9, 9, cfg, seed=1)
    subset = augment_pair(crops, cfg, draws)
    monkeypatch.setattr(A, "apply_where", lambda mask, op, x, f: torch.where(A._per_sample(mask), op(x, f), x))
    whole = augment_pair(crops, cfg, draws)
    for a, b in zip(subset, whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
