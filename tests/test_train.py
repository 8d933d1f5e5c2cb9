"""End to end through the CLI: training, exact resume, export, and every bad input."""
import json
import os

import pytest
import torch

from fastbyol.checkpoint import load_checkpoint
from fastbyol.cli import main

from helpers import add_bad_files, make_cifar_dir, make_image_folder, smoke_args


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=2, per_class=20)


def test_train_writes_checkpoint_metrics_and_plot(data_dir, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="fastbyol")
    assert main(smoke_args(data_dir, tmp_path / "run", "--max-steps", "3", "--train.knn_every", "1")) == 0
    header = caplog.records[0].getMessage()  # the first log line names what runs where
    for part in ("preset smoke", "device cpu", "world size 1", "precision fp32", f"data {data_dir} (36 images",
                 "16 px", "global batch 16"):
        assert part in header, header
    out = capsys.readouterr().out
    assert "loss" in out and "img/s" in out and "eta" in out and "kNN top-1" in out
    ckpt = load_checkpoint(str(tmp_path / "run"))
    assert ckpt["step"] == 3 and set(ckpt) >= {"online", "target", "optimizer", "rng", "config"}
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("knn_top1" in r for r in lines) and any("tau" in r for r in lines)
    assert os.path.getsize(tmp_path / "run" / "curves.png") > 1000


def _weights(run):
    ck = load_checkpoint(str(run))
    return {**{f"online.{k}": v for k, v in ck["online"].items()}, **{f"target.{k}": v for k, v in ck["target"].items()}}


def test_resume_is_exact(data_dir, tmp_path):
    # 36 training images / batch 16 = 2 steps per epoch; 3 epochs = 6 steps; stop at 3 (mid-epoch).
    common = ["--epochs", "3", "--train.log_every", "1"]
    assert main(smoke_args(data_dir, tmp_path / "straight", *common)) == 0
    assert main(smoke_args(data_dir, tmp_path / "split", *common, "--max-steps", "3")) == 0
    assert load_checkpoint(str(tmp_path / "split"))["step"] == 3
    assert main(smoke_args(data_dir, tmp_path / "split", *common, "--resume", str(tmp_path / "split"))) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert load_checkpoint(str(tmp_path / "split"))["step"] == 6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_export_loads_into_torchvision(tmp_path):
    import torchvision

    from fastbyol.checkpoint import atomic_save
    from fastbyol.cli import main as cli
    from fastbyol.model import BYOL

    model = BYOL("resnet50", projector_hidden=16, predictor_hidden=16, projection_dim=8)
    atomic_save({"online": model.online.state_dict()}, str(tmp_path / "ck.pt"))
    assert cli(["export", str(tmp_path / "ck.pt"), str(tmp_path / "enc.pt")]) == 0
    sd = torch.load(tmp_path / "enc.pt")
    res = torchvision.models.resnet50().load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    assert not os.path.exists(tmp_path / "enc.pt.json")  # no config in the checkpoint: no training record


def test_cifar_batches_train(tmp_path):
    root = make_cifar_dir(tmp_path / "cifar", n_per_batch=20, batches=2)
    assert main(smoke_args(root, tmp_path / "run", "--max-steps", "2")) == 0


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("make,msg", [
    (lambda t: str(t / "missing"), "does not exist"),
    (lambda t: (os.makedirs(t / "empty"), str(t / "empty"))[1], "holds no images"),
    (lambda t: (os.makedirs(t / "txt" / "a"), open(t / "txt" / "a" / "x.txt", "w").close(), str(t / "txt"))[2],
     "holds no images"),
])
def test_bad_data_folders(tmp_path, capsys, make, msg):
    code, err = _error(capsys, smoke_args(make(tmp_path), tmp_path / "run"))
    assert code == 2 and msg in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,msg", [
    (["train", "--preset", "imagenet-vit"], "invalid choice"),
    (["train", "--optim.nonsense", "1"], "unrecognized arguments"),
    (["train", "--preset", "smoke", "--optim.tau_base", "2"], "optim.tau_base"),
    (["train", "--preset", "smoke", "--train.batch_size", "many"], "train.batch_size"),
    (["train", "--preset", "smoke", "--zero-stage", "1"], "needs DeepSpeed"),
])
def test_bad_config(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1


def test_batch_larger_than_dataset(data_dir, tmp_path, capsys):
    code, err = _error(capsys, smoke_args(data_dir, tmp_path / "run", "--batch-size", "512"))
    assert code == 2 and "train.batch_size 512 (preset smoke) is larger than the data set (36 images" in err


def test_image_folder_preset_is_said_and_a_small_set_fails_cleanly(tmp_path, capsys, caplog):
    """A folder gets imagenet-resnet50: the first log line says so and names --preset; a data set
    smaller than its batch fails naming the preset and the presets that fit, leaving no --out."""
    caplog.set_level("INFO", logger="fastbyol")
    folder = make_image_folder(tmp_path / "small", classes=2, per_class=40, size=(12, 12))
    out = tmp_path / "runs" / "run"
    code, err = _error(capsys, ["train", "--data", folder, "--out", str(out)])
    first = caplog.records[0].getMessage()
    assert first.startswith("preset imagenet-resnet50") and "--preset default" in first and "224 px" in first
    _, msg = err.split("error: ")
    assert code == 2 and len(err.splitlines()) == 1
    assert msg.startswith("train.batch_size 4096 (preset imagenet-resnet50) is larger than the data set (72 images")
    assert "--preset default (batch 64, 32 px" in msg and "cifar10-resnet18" not in msg  # batch 256 > 72
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "runs")


def test_unwritable_out(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _error(capsys, smoke_args(data_dir, blocker / "run"))
    assert code == 2 and "cannot write to --out" in err


def test_corrupt_files_are_skipped_and_reported(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "d", classes=1, per_class=20)
    add_bad_files(tmp_path / "d" / "class0")
    assert main(smoke_args(folder, tmp_path / "run", "--max-steps", "2", "--data.val_fraction", "0.05")) == 0
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert max(r.get("skipped_files", 0) for r in recs) >= 1


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(smoke_args(data_dir, run, "--max-steps", "2", "--epochs", "3")) == 0
    before = open(run / "checkpoint.pt", "rb").read()
    code, err = _error(capsys, smoke_args(data_dir, run, "--epochs", "3", "--resume", str(run),
                                          "--lr", "1e38", "--train.log_every", "1",
                                          "--train.resume_override", "optim.base_lr"))
    assert code == 2 and "non-finite" in err and len(err.splitlines()) == 1
    assert open(run / "checkpoint.pt", "rb").read() == before


def test_resume_with_another_optimizer_is_refused(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(smoke_args(data_dir, run, "--max-steps", "1")) == 0
    code, err = _error(capsys, smoke_args(data_dir, run, "--resume", str(run), "--optimizer", "sgd"))
    assert code == 2 and "optim.optimizer 'lars' -> 'sgd'" in err and len(err.splitlines()) == 1
    code, err = _error(capsys, smoke_args(data_dir, run, "--resume", str(run), "--optimizer", "sgd",
                                          "--train.resume_override", "true"))
    assert code == 2 and "trained with LARS" in err


def test_help_documents_every_field(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "--optim.base_lr" in out and "global_batch / 256" in out and "--augment.view2.solarize_p" in out
    assert "Defaults depend on the preset" in " ".join(out.split())
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "--train.batch_size INT, --batch-size INT" in line)
    batch = " ".join(lines[at:at + 2])  # the help follows on the next line
    assert batch.endswith("(default: 64; cifar10-resnet18: 256, imagenet-resnet50: 4096, smoke: 16)"), batch


def test_all_images_unreadable(tmp_path, capsys):
    d = tmp_path / "bad" / "c"
    os.makedirs(d)
    for i in range(20):
        (d / f"{i}.jpg").write_bytes(b"not a jpeg")
    code, err = _error(capsys, smoke_args(str(tmp_path / "bad"), tmp_path / "run"))
    assert code == 2 and "no readable image in the data set" in err and len(err.splitlines()) == 1
