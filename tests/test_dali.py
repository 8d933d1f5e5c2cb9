"""The DALI data path on DALI's CPU backend (the GPU pipeline is the same definition).

Exactness is checked against a per-sample torch re-computation from the host-side draws
(every op, pixel by pixel); frequencies of each random op with configurations where only that
op is active; agreement with the torch path statistically (and exactly for the crops).
"""
import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from fastbyol.augment import crop_resize, draw_samples, gaussian_blur, grayscale, normalize, unnormalize  # noqa: E402
from fastbyol.config import AugmentConfig, ViewConfig, preset  # noqa: E402
from fastbyol.data.dali import DaliTwoViewLoader, import_dali  # noqa: E402
from fastbyol.data.dali_params import hue_rotation, jitter_matrices  # noqa: E402
from fastbyol.data.image_source import ImageSource  # noqa: E402
from fastbyol.data.sources import scan_image_folder  # noqa: E402
from fastbyol.data.batching import EpochShardSampler
from fastbyol.data.torch_loader import TorchTwoViewLoader  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402

from helpers import make_image_folder  # noqa: E402

CPU = torch.device("cpu")
OFF = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
DEFAULT = AugmentConfig()  # the paper's probabilities, read here instead of repeated


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """DALI's CPU threads and torch's OpenMP threads share this machine's cores; oversubscribed,
    OpenMP threads spin-wait and the tests' small torch ops run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def only(**ops) -> ViewConfig:
    """A view where only the named ops are active."""
    return ViewConfig(**{**OFF, **ops})


def loader(src, aug, batch, **kw):
    kw.setdefault("workers", 1)
    return DaliTwoViewLoader(src, aug, batch, CPU, **kw)


def smooth_folder(root, n=16, size=(40, 48), seed=0, ext="png"):
    """Images without pixel noise, so resampling differences stay small in pixel tests."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = np.stack([128 + 100 * np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)),
                        128 + 100 * np.cos(y / rng.uniform(3, 9)),
                        (x * y * rng.uniform(0.05, 0.2)) % 256], -1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(root, f"{i:03d}.{ext}"))
    return scan_image_folder(str(root))


def array_source(n=256, size=32, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageSource(labels=np.arange(n, dtype=np.int64), classes=[str(i) for i in range(n)], array=arr)


def full_image(size=32, **views) -> AugmentConfig:
    """The crop is the whole (square) image, so each output pixel can be traced to its input."""
    return AugmentConfig(image_size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **views)


# ----------------------------------------------------------------------------- basics

@pytest.mark.parametrize("out_dtype,channels_last", [(torch.float32, False), (torch.float16, True),
                                                     (torch.bfloat16, False)])
def test_views_shapes_dtype_range(tmp_path, out_dtype, channels_last):
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=3, per_class=8))
    aug = AugmentConfig(image_size=24)
    dl = loader(src, aug, 8, out_dtype=out_dtype, channels_last=channels_last)
    assert len(dl) == 3 and dl.batch_size == 8
    batches = list(dl)
    assert len(batches) == 3
    for b in batches:
        for v in (b.view1, b.view2):
            assert v.shape == (8, 3, 24, 24) and v.dtype == out_dtype and v.device == CPU
            assert v.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            pix = unnormalize(v.float(), aug)
            assert pix.min() >= -0.01 and pix.max() <= 1.01
        assert b.labels.dtype == torch.int64 and b.labels.shape == (8,)
        assert not torch.allclose(b.view1.float(), b.view2.float())
    mean = torch.stack([b.view1.float().mean((0, 2, 3)) for b in batches]).mean(0)
    assert mean.abs().max() < 1.0  # normalised, not raw pixels


def test_epoch_length_drops_the_partial_batch(tmp_path):
    src = array_source(50)
    assert len(loader(src, full_image(), 8)) == 6
    assert len(loader(src, full_image(), 8, rank=1, world_size=2)) == 3
    with pytest.raises(FastByolError, match="larger than the data set"):
        loader(src, full_image(), 32, world_size=2)


# ----------------------------------------------------------------------------- exactness

def draws_of(i, img, aug, seed, epoch):
    """Image ``i``'s draws, made for it alone (the loaders draw whole batches)."""
    return draw_samples([i], [img.size[1]], [img.size[0]], aug, seed, epoch)


def one_sample(d):
    """A one-sample :class:`ViewDraws` as ``(box, flip, jitter, factors, order, gray, blur, sigma, solarize)``."""
    return (tuple(int(v) for v in d.boxes[0]), bool(d.flip[0]), bool(d.jitter[0]), tuple(d.factors[0]),
            d.order[0].tolist(), bool(d.gray[0]), bool(d.blur[0]), float(d.sigma[0]), bool(d.solarize[0]))


def reference_view(img, draw, aug):
    """One view recomputed in torch from the host draws, op by op (jitter in the drawn order,
    clamped once after it, as the DALI path documents)."""
    box, flip, jitter, (b, c, s, h), order, gray, blur, sigma, sol = draw
    x = torch.from_numpy(crop_resize(img, box, aug.image_size)).float()[None] / 255
    if jitter:
        for op in order:
            if op == 0:
                x = x * b
            elif op == 1:
                x = c * x + (1 - c) * grayscale(x).mean()
            elif op == 2:
                x = s * x + (1 - s) * grayscale(x)
            else:
                x = torch.einsum("ij,bjhw->bihw", torch.from_numpy(hue_rotation(np.array([h]))[0]).float(), x)
        x = x.clamp(0, 1)
    if gray:
        x = grayscale(x).expand_as(x)
    if blur:
        x = gaussian_blur(x, torch.tensor([sigma]), aug.blur_kernel_size)
    if sol:
        x = torch.where(x >= 0.5, 1 - x, x)
    if flip:
        x = x.flip(3)
    return normalize(x, aug)[0]


def test_every_op_matches_a_per_sample_reference(tmp_path):
    src = smooth_folder(tmp_path / "d", n=16)
    aug = AugmentConfig(image_size=24, view1=ViewConfig(grayscale_p=0.5, blur_p=1.0, solarize_p=0.5),
                        view2=ViewConfig(blur_p=0.5, solarize_p=0.5))
    seed, epoch = 5, 2
    dl = loader(src, aug, 4, seed=seed)
    dl.set_epoch(epoch)
    errors, seen = [], set()
    for batch in dl:
        for j, i in enumerate(dl.last_indices.tolist()):
            img = Image.open(src.files[i]).convert("RGB")
            draws = [one_sample(d) for d in draws_of(i, img, aug, seed, epoch)]
            for out, draw in zip((batch.view1[j], batch.view2[j]), draws):
                errors.append((out - reference_view(img, draw, aug)).abs())
                seen.update(k for k, on in zip(("flip", "jitter", "gray", "blur", "sol"),
                                               (draw[1], draw[2], draw[5], draw[6], draw[8])) if on)
    assert seen == {"flip", "jitter", "gray", "blur", "sol"}
    err = torch.stack(errors)
    assert err.mean() < 3e-3 and err.max() < 0.1, (err.mean(), err.max())  # normalised units (~1/4 grey level)


def test_jitter_composition_is_identity_when_off_and_hue_third_turn_permutes():
    rng = np.random.default_rng(0)
    factors = np.c_[rng.uniform(0.6, 1.4, (5, 3)), rng.uniform(-0.1, 0.1, 5)]
    order = np.stack([rng.permutation(4) for _ in range(5)])
    a, t = jitter_matrices(factors, order, np.zeros(5, bool))
    assert np.allclose(a, np.eye(3)) and np.allclose(t, 0)
    assert np.allclose(hue_rotation(np.array([1 / 3]))[0] @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-6)


_ALL_OPS = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.0, grayscale_p=0.3,
                solarize_p=0.5, blur_p=0.5)


@pytest.mark.parametrize("ops,tol,kernels", [
    (dict(), 3e-3, "torch"),  # crops alone
    (dict(flip_p=0.5, grayscale_p=0.5, solarize_p=0.5, blur_p=0.5), 3e-3, "torch"),
    # DALI clamps once after the composed jitter, torch after each op: a few samples differ by
    # ~0.01, where a different draw (another factor, order or flip) differs by ~0.1.
    (dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.0), 0.02, "torch"),
    (_ALL_OPS, 0.02, "triton"),  # the fused kernel on the torch path (interpreted)
])
def test_views_match_the_torch_path_sample_by_sample(tmp_path, ops, tol, kernels):
    """Both paths draw every choice from draw_samples: the same seed gives the same views, image
    by image (up to resampling, and the clamping of DALI's composed jitter)."""
    src = smooth_folder(tmp_path / "d", n=16 if kernels == "torch" else 8)
    aug = AugmentConfig(image_size=24, view1=only(**ops), view2=only(**ops))
    dali_batches = list(loader(src, aug, 4, seed=3))
    torch_batches = list(TorchTwoViewLoader(src, aug, 4, CPU, seed=3, workers=0, kernels=kernels))
    assert len(dali_batches) == len(torch_batches) == len(src) // 4
    for d, t in zip(dali_batches, torch_batches):
        assert torch.equal(d.labels, t.labels)  # same sample order
        for dv, tv in ((d.view1, t.view1), (d.view2, t.view2)):
            per_sample = (unnormalize(dv, aug) - unnormalize(tv, aug)).abs().mean((1, 2, 3))
            assert per_sample.max() < tol, per_sample


# ----------------------------------------------------------------------------- randomness per sample

def classify(views, base, aug):
    """Per output sample: (flipped, gray, solarised), against the un-augmented images."""
    x = unnormalize(views.float(), aug)
    base = base.float() / 255
    flipped = (x - base.flip(3)).abs().amax((1, 2, 3)) < (x - base).abs().amax((1, 2, 3))
    base = torch.where(flipped.view(-1, 1, 1, 1), base.flip(3), base)
    gray = (x.amax(1) - x.amin(1)).amax((1, 2)) < 1e-3
    solar = torch.where(base >= 0.5, 1 - base, base)
    solarised = (x - solar).abs().amax((1, 2, 3)) < (x - base).abs().amax((1, 2, 3))
    return flipped, gray, solarised


def frequencies(aug, epochs=2, n=256, batch=32):
    src = array_source(n)
    base = torch.from_numpy(src.array).permute(0, 3, 1, 2)
    dl = loader(src, aug, batch, seed=11)
    rates, per_batch = [[], []], []
    for epoch in range(epochs):
        dl.set_epoch(epoch)
        for b in dl:
            ref = base[b.labels]
            for k, v in enumerate((b.view1, b.view2)):
                flags = classify(v, ref, aug)
                rates[k].append(torch.stack(flags, 1).float())
                per_batch.append(flags)
    return [torch.cat(r).mean(0) for r in rates], per_batch


def test_flip_is_drawn_per_sample_at_its_rate():
    p1, p2 = DEFAULT.view1.flip_p, DEFAULT.view2.flip_p
    (r1, r2), per_batch = frequencies(full_image(view1=only(flip_p=p1), view2=only(flip_p=p2)))
    assert abs(r1[0] - p1) < 0.07 and abs(r2[0] - p2) < 0.07
    assert r1[1] == r2[1] == 0 and r1[2] == r2[2] == 0
    # Per sample, not per batch: every batch holds both flipped and unflipped samples.
    assert all(0 < f.float().mean() < 1 for f, _, _ in per_batch)


def test_grayscale_rate_both_views():
    p1, p2 = DEFAULT.view1.grayscale_p, DEFAULT.view2.grayscale_p
    (r1, r2), _ = frequencies(full_image(view1=only(grayscale_p=p1), view2=only(grayscale_p=p2)))
    assert abs(r1[1] - p1) < 0.06 and abs(r2[1] - p2) < 0.06
    assert r1[0] == r2[0] == 0


def test_solarisation_rate_is_per_view():
    p1, p2 = DEFAULT.view1.solarize_p, DEFAULT.view2.solarize_p
    assert p1 == 0 and p2 > 0
    (r1, r2), _ = frequencies(full_image(view1=only(solarize_p=p1), view2=only(solarize_p=p2)))
    assert r1[2] == 0 and abs(r2[2] - p2) < 0.06
    assert r1[1] == r2[1] == 0


def test_statistics_match_the_torch_path(tmp_path):
    """Per-channel mean and std of each view over a generated set, full default recipe."""
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=4, per_class=32, size=(40, 48)))
    aug = AugmentConfig(image_size=32)

    def stats(dl):
        v1, v2 = [], []
        for epoch in range(4):  # 512 samples per view: two torch-path seeds differ by <0.045 here
            dl.set_epoch(epoch)
            for b in dl:
                v1.append(b.view1.float())
                v2.append(b.view2.float())
        return [(torch.cat(v).mean((0, 2, 3)), torch.cat(v).std((0, 2, 3))) for v in (v1, v2)]

    dali_stats = stats(loader(src, aug, 16, seed=1, workers=2))
    torch_stats = stats(TorchTwoViewLoader(src, aug, 16, CPU, seed=1, workers=0))
    for (dm, ds), (tm, ts) in zip(dali_stats, torch_stats):
        assert (dm - tm).abs().max() < 0.08, (dm, tm)
        assert ((ds - ts).abs() / ts).max() < 0.08, (ds, ts)


# ----------------------------------------------------------------------------- order, sharding, resume

def test_shards_cover_the_data_once_per_epoch(tmp_path):
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=1, per_class=22, size=(20, 24)))
    src.labels = np.arange(len(src), dtype=np.int64)  # a label per file: which samples came
    aug = AugmentConfig(image_size=16)
    batch, world, epoch = 4, 2, 3
    seen = []
    for rank in range(world):
        dl = loader(src, aug, batch, seed=7, rank=rank, world_size=world)
        dl.set_epoch(epoch)
        labels = torch.cat([b.labels for b in dl]).tolist()
        assert len(labels) == len(dl) * batch == 8
        sampler = EpochShardSampler(len(src), batch, 7, rank, world)
        sampler.epoch = epoch
        assert labels == list(sampler)  # the torch path's order and shard
        seen.append(labels)
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 16  # 22 files: the tail that fills no global batch is dropped
    dl.set_epoch(epoch + 1)
    assert torch.cat([b.labels for b in dl]).tolist() != seen[1]  # reshuffled every epoch


def test_resume_replays_the_same_batches():
    src = array_source(64)
    aug = AugmentConfig(image_size=32)
    full = loader(src, aug, 8, seed=2)
    full.set_epoch(1)
    batches = list(full)
    part = loader(src, aug, 8, seed=2)
    part.set_epoch(1, start_micro_batch=5)
    tail = list(part)
    assert len(tail) == 3
    for a, b in zip(batches[5:], tail):
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2) and torch.equal(a.labels, b.labels)
    # The same loader reused after an abandoned pass.
    it = iter(full)
    next(it)
    it.close()
    full.set_epoch(1, start_micro_batch=5)
    assert torch.equal(next(iter(full)).view1, batches[5].view1)


def test_stopping_after_the_last_batch_keeps_the_pipeline():
    """The trainer breaks out of the loop after an epoch's last step: the next epoch reuses the
    pipeline (no rebuild) and is the same as from a fresh loader."""
    src, aug = array_source(32), AugmentConfig(image_size=32)
    dl = loader(src, aug, 8, seed=3)
    for epoch in range(2):
        dl.set_epoch(epoch)
        for k, b in enumerate(dl):
            if k == len(dl) - 1:
                break
        pipeline = dl._iterator
        assert pipeline is not None
    fresh = loader(src, aug, 8, seed=3)
    fresh.set_epoch(2)
    dl.set_epoch(2)
    assert all(torch.equal(a.view2, b.view2) for a, b in zip(dl, fresh))
    assert dl._iterator is pipeline


# ----------------------------------------------------------------------------- bad input

def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_bad_files_are_replaced_counted_and_the_rest_decoded(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "d", classes=1, per_class=13, size=(40, 48))
    d = tmp_path / "d" / "class0"
    rgb = Image.open(d / "000.jpg").convert("RGB")
    good = (d / "001.jpg").read_bytes()
    (d / "gray.jpg").write_bytes(_encode(rgb.convert("L"), "JPEG"))
    (d / "cmyk.jpg").write_bytes(_encode(rgb.convert("CMYK"), "JPEG"))
    (d / "palette.png").write_bytes(_encode(rgb.convert("P"), "PNG"))
    (d / "tiny.jpg").write_bytes(_encode(rgb.resize((8, 8)), "JPEG"))  # smaller than the crop
    (d / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    # Passes the cheap check (valid header, end marker) but DALI's decoder rejects it: the
    # loader must find it by decoding the in-flight files one by one, then carry on.
    bogus = bytearray(good)
    dht = bogus.find(b"\xff\xc4")
    bogus[dht + 5: dht + 21] = b"\xff" * 16
    (d / "bogus_huffman.jpg").write_bytes(bytes(bogus))
    src = scan_image_folder(folder)
    assert len(src) == 20
    aug = AugmentConfig(image_size=16)
    dl = loader(src, aug, 4)
    with caplog.at_level("WARNING", logger="fastbyol.data"):
        batches = list(dl)
    assert [b.view1.shape[0] for b in batches] == [4] * 5  # never a shrunken batch
    assert all(torch.isfinite(b.view1).all() and torch.isfinite(b.view2).all() for b in batches)
    assert dl.skipped == 3
    assert {os.path.basename(f) for f in dl.bad_files} == {"corrupt.jpg", "truncated.jpg", "bogus_huffman.jpg"}
    assert "replaced" in caplog.text
    dl.set_epoch(1)  # known-bad files are replaced without another pipeline failure, and counted again
    assert [b.view1.shape[0] for b in dl] == [4] * 5 and dl.skipped == 6


# ----------------------------------------------------------------------------- GPU mode

@pytest.mark.parametrize("encoded", [True, False])
def test_gpu_definition_places_the_views_on_the_gpu(monkeypatch, encoded):
    """The GPU pipeline is the CPU one with other placements: its graph is defined (not built:
    no CUDA here) and both views come out of GPU operators, the labels from the host."""
    from nvidia.dali.pipeline import Pipeline

    from fastbyol.data.dali import byol_two_view_pipeline

    if not hasattr(Pipeline, "_build_graph"):
        pytest.skip("this DALI version defines graphs differently")
    monkeypatch.setattr(Pipeline, "build", lambda self: None)
    pipe = byol_two_view_pipeline(lambda: None, AugmentConfig(view2=ViewConfig(grayscale_p=1.0, blur_p=0.3)), 8,
                                  encoded=encoded, device_id=0, fp16=True, channels_last=True)
    pipe._build_graph()
    assert [o.device for o in pipe._graph_outputs] == ["gpu", "gpu", "cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mode_matches_cpu_mode(tmp_path):
    src = smooth_folder(tmp_path / "d", n=16, ext="jpg")
    aug = AugmentConfig(image_size=24)
    cpu = list(loader(src, aug, 4, seed=4))
    gpu = list(DaliTwoViewLoader(src, aug, 4, torch.device("cuda"), seed=4, workers=1))
    for c, g in zip(cpu, gpu):
        assert g.view1.is_cuda and torch.equal(c.labels, g.labels.cpu())
        # nvJPEG / the HW decoder round differently from libjpeg-turbo: close, not equal.
        assert (c.view1 - g.view1.cpu()).abs().mean() < 0.02 and (c.view2 - g.view2.cpu()).abs().mean() < 0.02


# ----------------------------------------------------------------------------- integration

def test_build_train_loader_picks_dali(tmp_path):
    from fastbyol.data import build_train_loader

    cfg = preset("smoke")
    cfg.data.loader = "dali"
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=2, per_class=8, size=(20, 24)))
    for layout, fmt in (("on", torch.channels_last), ("off", torch.contiguous_format)):
        cfg.train.channels_last = layout  # the views take the encoder's layout
        dl = build_train_loader(cfg, src, CPU, micro_batch=4)
        assert isinstance(dl, DaliTwoViewLoader)
        b = next(iter(dl))
        assert b.view1.shape == (4, 3, cfg.augment.image_size, cfg.augment.image_size)
        assert b.view1.is_contiguous(memory_format=fmt)


def test_missing_dali_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(FastByolError, match=r"pip install 'fastbyol\[dali\]'"):
        import_dali()
    with pytest.raises(FastByolError, match="nvidia-dali-cuda130"):
        DaliTwoViewLoader(array_source(8), full_image(), 4, CPU)


def test_benchmark_smoke(tmp_path):
    from fastbyol.bench import pipeline as bench_pipeline

    result = bench_pipeline.main(["--smoke", "--out", str(tmp_path), "--cache", str(tmp_path / "jpegs")])
    methods = {(r["case"], r["method"]) for r in result["rows"]}
    assert {("jpeg-64px", "dali-cpu"), ("jpeg-64px", "torchvision"), ("cifar-32px", "dali-cpu")} <= methods
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    assert result["dali"] and os.path.exists(tmp_path / "pipeline_smoke.json")
