"""Webdataset tar shards as a data source: indexing, labels, random-access reads, both
loaders, the CLI, and bad shards."""
import os
import tarfile

import numpy as np
import pytest
import torch

from fastbyol.cli import main
from fastbyol.config import preset
from fastbyol.data import webdataset
from fastbyol.data.image_source import read_encoded
from fastbyol.data.sources import load_source, split_holdout
from fastbyol.data.webdataset import expand_braces, scan_webdataset
from fastbyol.data.torch_loader import TorchTwoViewLoader, open_rgb
from fastbyol.errors import FastByolError

from helpers import make_image_folder, make_tar_shards

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Shard indexes are cached under $FASTBYOL_CACHE: keep each test's to itself."""
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("wds")
    folder = make_image_folder(base / "imgs", classes=3, per_class=5, size=(36, 44))
    root, written = make_tar_shards(base / "shards", folder, shards=3)
    return root, written


def test_brace_patterns():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_pattern_and_single_shard_index_the_same_members(shards):
    root, written = shards
    whole = load_source(root)  # a folder of .tar files
    assert len(whole) == len(written) == 15 and whole.classes == ["0", "1", "2"]
    assert sorted(whole.labels.tolist()) == sorted(c for c, _ in written)
    pattern = load_source(os.path.join(root, "shard-{000..002}.tar"))
    assert pattern.files == whole.files and np.array_equal(pattern.tar.index, whole.tar.index)
    one = load_source(os.path.join(root, "shard-001.tar"))
    assert len(one) == 5 and all(":sample" in f for f in one.files)


def test_reads_return_each_members_bytes_with_its_label(shards):
    root, written = shards
    src = scan_webdataset(root)
    expected = sorted((c, d) for c, d in written)
    got = sorted((int(src.labels[i]), read_encoded(src, i)) for i in range(len(src)))
    assert got == expected
    val_train, val = split_holdout(src, 0.4, seed=0)  # subsets keep their offsets
    for part in (val_train, val):
        for i in range(len(part)):
            assert (int(part.labels[i]), read_encoded(part, i)) in expected


def test_unlabelled_shards_are_one_class(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    root, _ = make_tar_shards(tmp_path / "s", folder, shards=1, labels=False)
    src = load_source(root)
    assert src.classes == ["."] and src.labels.tolist() == [0, 0, 0, 0]


def test_torch_loader_reads_shards_in_workers_and_replaces_bad_members(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=6)
    good = open(os.path.join(folder, "class0", "000.jpg"), "rb").read()
    extra = {"bad1.jpg": b"not a jpeg", "bad1.cls": b"0", "cut.jpg": good[: len(good) // 3], "cut.cls": b"1",
             "orphan.cls": b"1"}  # a label without an image is not a sample
    root, _ = make_tar_shards(tmp_path / "s", folder, shards=2, extra=extra)
    src = load_source(root)
    assert len(src) == 14
    aug = preset("smoke").augment
    loader = TorchTwoViewLoader(src, aug, 4, CPU, workers=2)
    batches = list(loader)
    assert [b.view1.shape[0] for b in batches] == [4, 4, 4] and loader.skipped == 2
    assert all(torch.isfinite(b.view1).all() for b in batches)
    # Same views as the same images read from the folder, when the sample order agrees.
    direct = TorchTwoViewLoader(src, aug, 4, CPU, workers=0)
    a, b = list(direct), batches
    for x, y in zip(a, b):
        assert torch.equal(x.view1, y.view1) and torch.equal(x.labels, y.labels)


def test_dali_loader_reads_shards(shards):
    pytest.importorskip("nvidia.dali")
    from fastbyol.data.dali import DaliTwoViewLoader

    src = load_source(shards[0])
    dl = DaliTwoViewLoader(src, preset("smoke").augment, 5, CPU, workers=1)
    batches = list(dl)
    assert len(batches) == 3 and dl.skipped == 0
    labels = torch.cat([b.labels for b in batches]).sort().values
    assert labels.tolist() == sorted(src.labels.tolist())


def test_cli_trains_on_shards(shards, tmp_path):
    argv = ["train", "--preset", "smoke", "--data", shards[0], "--out", str(tmp_path / "run"),
            "--train.kernels", "torch", "--train.knn_every", "0", "--max-steps", "2", "--batch-size", "4",
            "--data.val_fraction", "0.2"]
    assert main(argv) == 0


@pytest.mark.parametrize("make,msg", [
    (lambda p: str(p / "missing-{000..001}.tar"), "does not exist"),
    (lambda p: _write(p / "x.tar.gz", b""), "compressed"),
    (lambda p: _write(p / "junk.tar", b"\x01" * 2048), "cannot read tar shard"),
    (lambda p: _tar(p / "t.tar", {"a.txt": b"hello"}), "hold no images"),
    (lambda p: _tar(p / "t.tar", {"a.jpg": b"x", "a.cls": b"cat"}), "not a class number"),
    (lambda p: _tar(p / "t.tar", {"a.jpg": b"x", "a.cls": b"1", "b.jpg": b"x"}), "have no .cls label"),
])
def test_bad_shards_give_one_clear_error(tmp_path, make, msg):
    with pytest.raises(FastByolError, match=msg):
        load_source(make(tmp_path))


def test_bad_shards_through_the_cli(tmp_path, capsys):
    code = main(["train", "--preset", "smoke", "--data", str(tmp_path / "none-{0..3}.tar"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "does not exist" in err[0]


def _tar(path, members):
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def test_a_shard_cut_short_keeps_its_complete_members(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs", classes=1, per_class=4)
    root, _ = make_tar_shards(tmp_path / "s", folder, shards=1)
    path = os.path.join(root, "shard-000.tar")
    whole = scan_webdataset(path)
    last = whole.tar.index[-1]
    with open(path, "r+b") as fh:  # an interrupted copy: the last image's data breaks off
        fh.truncate(int(last[1] + last[2] // 2))
    with caplog.at_level("WARNING", logger="fastbyol.data"):
        cut = scan_webdataset(path)
    assert len(cut) == 3 and "breaks off" in caplog.text  # the last group may be incomplete: dropped
    for i in range(3):
        assert read_encoded(cut, i) == read_encoded(whole, i)
    short = whole.subset([3])  # indexed before the cut: its read fails cleanly, and is counted
    with pytest.raises(OSError, match="cut short"):
        read_encoded(short, 0)
    assert open_rgb(short, 0) is None


def test_the_shard_index_is_cached_and_renewed_when_the_shard_changes(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    root, _ = make_tar_shards(tmp_path / "s", folder, shards=2)
    first = scan_webdataset(root)
    assert len(os.listdir(tmp_path / "cache" / "wds-index")) == 2
    reads = []
    real = webdataset._read_tar_index
    monkeypatch.setattr(webdataset, "_read_tar_index", lambda p: reads.append(p) or real(p))
    again = scan_webdataset(root)
    assert reads == [] and again.files == first.files and again.labels.tolist() == first.labels.tolist()
    assert np.array_equal(again.tar.index, first.tar.index)
    shard = os.path.join(root, "shard-001.tar")
    with tarfile.open(shard, "a") as tar:  # the shard grows: its index is read again, the other's not
        tar.add(os.path.join(folder, "class0", "000.jpg"), arcname="late.jpg")
        tar.add(_write(tmp_path / "late.cls", b"1"), arcname="late.cls")
    grown = scan_webdataset(root)
    assert reads == [shard] and len(grown) == len(first) + 1
    monkeypatch.setenv("FASTBYOL_CACHE", "/proc/no-cache-here")  # unwritable: indexes are just not kept
    assert len(scan_webdataset(root)) == len(grown)
