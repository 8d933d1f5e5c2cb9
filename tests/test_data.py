"""Sources (folders, CIFAR batches, hold-out split) and the torch two-view loader."""
import os

import numpy as np
import pytest
import torch

from fastbyol.config import preset
from fastbyol.data.sources import load_cifar, load_source, scan_image_folder, split_holdout
from fastbyol.data.batching import EpochShardSampler
from fastbyol.data.torch_loader import TorchTwoViewLoader
from fastbyol.errors import FastByolError

from helpers import add_bad_files, make_cifar_dir, make_image_folder

CPU = torch.device("cpu")


def test_scan_image_folder(tmp_path):
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=3, per_class=4))
    assert len(src) == 12 and src.classes == ["class0", "class1", "class2"]
    assert np.bincount(src.labels).tolist() == [4, 4, 4]


@pytest.mark.parametrize("setup,msg", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "holds no images"),
    (lambda p: (p.mkdir(), (p / "a").mkdir(), (p / "a" / "notes.txt").write_text("x")), "holds no images"),
])
def test_scan_rejects_missing_and_empty(tmp_path, setup, msg):
    p = tmp_path / "data"
    setup(p)
    with pytest.raises(FastByolError, match=msg):
        scan_image_folder(str(p))


def test_cifar_batches(tmp_path):
    root = make_cifar_dir(tmp_path / "cifar", n_per_batch=20, batches=2)
    train, test = load_cifar(root, train=True), load_cifar(root, train=False)
    assert train.array.shape == (40, 32, 32, 3) and train.array.dtype == np.uint8
    assert len(test) == 10 and train.classes[0] == "c0"
    assert load_source(root).array is not None


def test_split_holdout_is_stratified_and_disjoint(tmp_path):
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=3, per_class=10))
    train, val = split_holdout(src, 0.2, seed=0)
    assert len(train) + len(val) == 30 and np.bincount(val.labels).tolist() == [2, 2, 2]
    assert not set(train.files) & set(val.files)


def _loader(src, batch, **kw):
    aug = preset("smoke").augment
    return TorchTwoViewLoader(src, aug, batch, CPU, workers=0, **kw)


def test_loader_yields_normalised_views(tmp_path):
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=2, per_class=8))
    loader = _loader(src, 4)
    assert len(loader) == 4
    batches = list(loader)
    assert len(batches) == 4
    b = batches[0]
    assert b.view1.shape == b.view2.shape == (4, 3, 16, 16) and b.view1.dtype == torch.float32
    assert not torch.allclose(b.view1, b.view2)


def test_shards_cover_the_data_once_per_epoch():
    n, batch, world = 103, 5, 2
    seen = []
    for rank in range(world):
        s = EpochShardSampler(n, batch, seed=1, rank=rank, world_size=world)
        s.epoch = 3
        seen.append(list(s))
        assert len(seen[-1]) == s.micro_batches_per_epoch() * batch == 50
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 100  # the tail that fills no global batch is dropped
    s2 = EpochShardSampler(n, batch, seed=1, rank=0, world_size=world)
    s2.epoch = 4
    assert list(s2) != seen[0]  # reshuffled every epoch


@pytest.mark.parametrize("world,accum", [(2, 2), (4, 1), (8, 2)])
def test_each_optimizer_step_sees_the_same_samples_whatever_the_rank_count(world, accum):
    """Global batch 16 as 1 rank x 16, or world x accum x micro: the samples of optimizer step k
    are the same set, so a run resumed on another number of ranks continues at the same place."""
    def per_step(w, a):
        micro = 16 // (w * a)
        ranks = [list(EpochShardSampler(100, micro, 3, r, w)) for r in range(w)]
        steps = len(ranks[0]) // (micro * a)
        return [sorted(i for r in ranks for i in r[k * micro * a:(k + 1) * micro * a]) for k in range(steps)]

    assert per_step(world, accum) == per_step(1, 1) and len(per_step(1, 1)) == 6


def test_resume_position_replays_the_same_batches(tmp_path):
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=2, per_class=8))
    full = _loader(src, 4)
    full.set_epoch(2, 0)
    all_batches = list(full)
    part = _loader(src, 4)
    part.set_epoch(2, 2)
    tail = list(part)
    assert len(tail) == 2
    for a, b in zip(all_batches[2:], tail):
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)


def test_corrupt_and_truncated_files_are_replaced_and_counted(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=1, per_class=6)
    add_bad_files(tmp_path / "d" / "class0")
    src = scan_image_folder(folder)
    assert len(src) == 8
    loader = _loader(src, 4)
    sizes = [b.view1.shape[0] for b in loader]
    assert sizes == [4, 4] and loader.skipped == 2  # full batches: the bad files' places are filled
    assert {os.path.basename(f) for f in loader.bad_files} == {"corrupt.jpg", "truncated.jpg"}


def test_substitute_is_the_next_readable_sample_whatever_the_loader_state(tmp_path):
    from fastbyol.data.substitute import NoReadableImage, Substitutes

    readable = {2, 5}
    sub = Substitutes(7)
    load = lambda j: f"img{j}" if j in readable else None  # noqa: E731
    assert sub.resolve(3, load) == (5, "img5") and sub.bad == {3, 4}
    assert sub.resolve(6, load) == (2, "img2")  # wraps around the end of the data set
    assert Substitutes(7).resolve(6, load) == (2, "img2")  # same answer without the memory
    with pytest.raises(NoReadableImage, match="no readable image in the data set: all 3 files"):
        Substitutes(3).resolve(1, lambda j: None)


def test_batch_larger_than_dataset(tmp_path):
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=1, per_class=3))
    with pytest.raises(FastByolError, match="larger than the data set"):
        _loader(src, 8)


def test_cpu_workers_augment_the_same_views_as_the_main_process(tmp_path):
    """On a CPU device the workers run the batched photometric half too; the views must
    be exactly those the main process would make for the same steps."""
    src = scan_image_folder(make_image_folder(tmp_path / "d", classes=2, per_class=8))
    aug = preset("smoke").augment
    main = TorchTwoViewLoader(src, aug, 4, CPU, workers=0)
    pooled = TorchTwoViewLoader(src, aug, 4, CPU, workers=2)
    for lo in (main, pooled):
        lo.set_epoch(1, 1)
    a, b = list(main), list(pooled)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert torch.equal(x.view1, y.view1) and torch.equal(x.view2, y.view2) and torch.equal(x.labels, y.labels)


def test_views_leave_the_loader_in_the_training_dtype_on_cuda_only():
    from fastbyol.data import view_dtype

    cuda = torch.device("cuda", 0)
    assert view_dtype("bf16", cuda) == torch.bfloat16 and view_dtype("fp16", cuda) == torch.float16
    assert view_dtype("fp32", cuda) == torch.float32 and view_dtype("bf16", CPU) == torch.float32
