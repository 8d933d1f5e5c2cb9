"""`fastbyol eval linear|knn`: the protocol on small generated data, every encoder source, each
bad input, sharded kNN == one process, and 2-process runs (gloo via torchrun)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastbyol.cli import main

from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_coloured_folder(root, classes=3, per_class=16, seed=0, size=20):
    """Class c: noise around its own colour, so that even random features separate the classes."""
    rng = np.random.default_rng(seed)
    palette = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]])
    for c in range(classes):
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            img = np.clip(palette[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"{i:03d}.jpg"), quality=90)
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    return make_coloured_folder(root / "train"), make_coloured_folder(root / "val", per_class=6, seed=1)


def common(train, val, out, *extra):
    return ["--data", train, "--val-data", val, "--out", str(out), "--workers", "0", "--image-size", "16",
            "--device", "cpu", *extra]


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(code, err, msg):
    assert code == 2 and msg in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


# ----------------------------------------------------------------------------- the protocol

@pytest.mark.parametrize("mode", ["full", "features"])
def test_linear_protocol_learns_and_reports(data, tmp_path, capsys, mode):
    train, val = data
    argv = ["eval", "linear", "--random-init", "--backbone", "convnet4", "--mode", mode, "--epochs", "4",
            "--lr", "0.05,0.5", "--standardize", "true", *common(train, val, tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{mode} mode" in out and "random init" in out and "epoch 4/4" in out and "held-out top-1" in out
    res = json.load(open(tmp_path / f"linear_{mode}_random-init.json"))
    assert res["mode"] == mode and res["encoder"]["network"] == "random init"
    assert len(res["epochs"]) == 4 and all({"loss", "top1", "top5", "lr"} <= set(r) for r in res["epochs"])
    grid = res["lr_selection"]
    assert [g["lr"] for g in grid] == [0.05, 0.5]
    assert res["lr"] == max(grid, key=lambda g: (g["holdout_top1"], -g["lr"]))["lr"]
    assert res["top1"] >= 80.0 and res["top5"] == 100.0  # 3 colour classes: chance is 33%
    assert res["config"]["batch_size_used"] == 16  # 1024 fitted to 48 images
    assert os.path.getsize(tmp_path / f"linear_{mode}_random-init.png") > 1000


def test_probe_training_is_exercised():
    """A probe trained with lr 0 stays at its initial (chance-level) accuracy: the protocol
    test above can fail."""
    from fastbyol.eval.features import Features
    from fastbyol.eval.linear import LinearConfig, evaluate, precomputed_batches, train_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = torch.randn(120, 8, generator=g) + 3 * torch.nn.functional.one_hot(y, 8).float()
    f = Features(x, y, torch.arange(120))
    cfg = LinearConfig(epochs=5, lrs=(0.5,))
    good, _ = train_probe(precomputed_batches(f, 16, 0), 8, 8, 3, 0.5, cfg, torch.device("cpu"))
    frozen, _ = train_probe(precomputed_batches(f, 16, 0), 8, 8, 3, 1e-12, cfg, torch.device("cpu"))
    assert evaluate(good, f)[0] > 95 and evaluate(frozen, f)[0] < 80


def test_knn_of_a_checkpoint_equals_the_training_monitor(tmp_path, capsys):
    """`eval knn --random-init RUN` rebuilds the encoder the run started from and gets the
    monitor's random-init kNN; the trained encoder gets the run's last kNN."""
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=20)
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--data", folder, "--out", str(run), "--train.kernels", "torch",
                 "--max-steps", "2", "--train.knn_every", "1", "--workers", "0"]) == 0
    summary = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    for extra, key in (([], "knn_top1"), (["--random-init"], "knn_top1_random_init")):
        assert main(["eval", "knn", str(run), "--k", "10", "--workers", "0", *extra]) == 0
        name = "random-init" if extra else "online"
        res = json.load(open(run / "eval" / f"knn_{name}.json"))
        assert res["results"][0]["k"] == 10
        assert res["results"][0]["top1"] == pytest.approx(summary[key], abs=1e-9)


def test_resumed_run_does_not_repeat_its_last_knn(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=20)
    args = ["train", "--preset", "smoke", "--data", folder, "--out", str(tmp_path / "run"), "--train.kernels",
            "torch", "--max-steps", "2", "--train.knn_every", "1", "--workers", "0"]
    assert main(args) == 0
    assert main(args + ["--resume", str(tmp_path / "run")]) == 0  # nothing left to train
    knn = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if "knn_top1" in x]
    assert [r["step"] for r in knn] == [0, 2]


# ----------------------------------------------------------------------------- encoder sources

def test_state_dicts_are_recognised(tmp_path):
    import torchvision

    from fastbyol.backbones import ConvNet4
    from fastbyol.eval.encoder import load_encoder

    net = torchvision.models.resnet18(num_classes=10)  # supervised-style file: with its fc classifier
    torch.save(net.state_dict(), tmp_path / "tv.pt")
    enc = load_encoder(str(tmp_path / "tv.pt"))
    assert (enc.backbone, enc.cifar_stem, enc.kind) == ("resnet18", False, "state_dict")
    assert "fc.* dropped" in enc.notes[0]
    assert torch.equal(enc.encoder.state_dict()["layer4.1.conv2.weight"], net.state_dict()["layer4.1.conv2.weight"])
    conv = ConvNet4()
    torch.save({"state_dict": {f"module.{k}": v for k, v in conv.state_dict().items()}}, tmp_path / "wrapped.pt")
    enc = load_encoder(str(tmp_path / "wrapped.pt"))
    assert enc.backbone == "convnet4"
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in enc.encoder.state_dict().items())


def test_exported_encoder_evaluates_like_its_checkpoint(data, tmp_path, capsys):
    from fastbyol.checkpoint import atomic_save
    from fastbyol.model import BYOL

    model = BYOL("convnet4", projector_hidden=16, predictor_hidden=16, projection_dim=8)
    atomic_save({"online": model.online.state_dict(), "config": _cfg_dict(), "step": 7}, str(tmp_path / "ck.pt"))
    assert main(["export", str(tmp_path / "ck.pt"), str(tmp_path / "enc.pt")]) == 0
    train, val = data
    tops = []
    for src in ("ck.pt", "enc.pt"):
        assert main(["eval", "knn", str(tmp_path / src), "--k", "5", *common(train, val, tmp_path / src[:2])]) == 0
        res = json.load(open(tmp_path / src[:2] / f"knn_{'online' if src == 'ck.pt' else 'enc'}.json"))
        tops.append(res["results"][0]["top1"])
    assert tops[0] == tops[1]
    assert "online encoder of fastbyol checkpoint" in capsys.readouterr().out


def _small_run_checkpoint(path):
    """A checkpoint of the smoke preset (16 px, kNN k 10) whose settings differ from eval's old
    guesses (224 px, k 200)."""
    from fastbyol.checkpoint import atomic_save
    from fastbyol.model import BYOL

    torch.manual_seed(0)
    model = BYOL("convnet4", projector_hidden=16, predictor_hidden=16, projection_dim=8)
    atomic_save({"online": model.online.state_dict(), "config": _cfg_dict(), "step": 7}, str(path))
    return model


def test_export_carries_its_training_record_and_eval_uses_it(data, tmp_path, capsys):
    from fastbyol.backbones import ConvNet4
    from fastbyol.config import preset

    model = _small_run_checkpoint(tmp_path / "ck.pt")
    assert main(["export", str(tmp_path / "ck.pt"), str(tmp_path / "enc.pt")]) == 0
    assert "training record" in capsys.readouterr().out
    sd = torch.load(tmp_path / "enc.pt", weights_only=True)  # still a plain state_dict: loads strictly
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    ConvNet4().load_state_dict(sd)
    smoke = preset("smoke")
    record = json.load(open(tmp_path / "enc.pt.json"))
    assert {k: record[k] for k in ("preset", "backbone", "cifar_stem", "image_size", "knn_k", "step")} == {
        "preset": "smoke", "backbone": "convnet4", "cifar_stem": False, "image_size": smoke.augment.image_size,
        "knn_k": smoke.train.knn_k, "step": 7}
    assert record["mean"] == list(smoke.augment.mean) and record["std"] == list(smoke.augment.std)
    train, val = data
    results = {}
    for src in ("ck.pt", "enc.pt"):  # no --image-size, no --k: both from the training
        out = tmp_path / src[:2]
        assert main(["eval", "knn", str(tmp_path / src), "--data", train, "--val-data", val, "--out", str(out),
                     "--workers", "0", "--device", "cpu"]) == 0
        line = capsys.readouterr().out.splitlines()[-2]  # the result, then "wrote ..."
        assert line.startswith(f"kNN (k={smoke.train.knn_k}, T={smoke.train.knn_t}, "
                               f"{smoke.augment.image_size} px, preset smoke) online encoder: top-1"), line
        results[src] = json.load(open(out / f"knn_{'online' if src == 'ck.pt' else 'enc'}.json"))
    a, b = results["ck.pt"], results["enc.pt"]
    assert a["image_size"] == b["image_size"] == smoke.augment.image_size and b["preset"] == "smoke"
    assert a["results"] == b["results"] and b["results"][0]["k"] == smoke.train.knn_k
    assert b["encoder"]["kind"] == "fastbyol export" and b["encoder"]["step"] == 7


def test_a_bare_state_dict_needs_its_image_size_and_preset(data, tmp_path, capsys):
    from fastbyol.backbones import ConvNet4

    torch.save(ConvNet4().state_dict(), tmp_path / "bare.pt")
    train, val = data
    base = [str(tmp_path / "bare.pt"), "--data", train, "--val-data", val, "--out", str(tmp_path / "o"),
            "--workers", "0", "--device", "cpu"]
    for cmd, extra, missing, present in (
            ("knn", [], ["--image-size"], ["--preset"]),
            ("linear", [], ["--image-size", "--preset"], []),
            ("linear", ["--image-size", "16"], ["--preset"], ["--image-size"])):
        code, err = _error(capsys, ["eval", cmd, *base, *extra])
        _one_line(code, err, "is a state_dict without a training record")
        assert all(m in err for m in missing) and not any(p in err for p in present), err
    assert main(["eval", "linear", *base, "--image-size", "16", "--preset", "default", "--mode", "features",
                 "--epochs", "1", "--lr", "0.1"]) == 0
    assert "(features mode, encoder, 16 px, preset default, lr 0.1" in capsys.readouterr().out
    assert main(["eval", "knn", *base, "--image-size", "16", "--k", "5"]) == 0
    assert "kNN (k=5, T=0.1, 16 px, preset " in capsys.readouterr().out


def test_a_stale_training_record_is_refused(tmp_path, capsys):
    import torchvision

    _small_run_checkpoint(tmp_path / "ck.pt")
    assert main(["export", str(tmp_path / "ck.pt"), str(tmp_path / "enc.pt")]) == 0
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "enc.pt")  # overwritten by hand
    code, err = _error(capsys, ["eval", "knn", str(tmp_path / "enc.pt"), "--image-size", "16"])
    _one_line(code, err, "describes a convnet4")


def _cfg_dict():
    from fastbyol.config import preset

    return preset("smoke").to_dict()


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def convnet_files(tmp_path_factory):
    from fastbyol.backbones import ConvNet4
    from fastbyol.checkpoint import atomic_save
    from fastbyol.model import BYOL

    root = tmp_path_factory.mktemp("ckpts")
    torch.save(ConvNet4().state_dict(), root / "convnet.pt")
    model = BYOL("convnet4", projector_hidden=16, predictor_hidden=16, projection_dim=8)
    atomic_save({"online": model.online.state_dict(), "config": _cfg_dict(), "step": 1}, str(root / "checkpoint.pt"))
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, root / "foreign.pt")
    torch.save({"linear.weight": torch.zeros(3, 3)}, root / "foreign_tensors.pt")
    (root / "text.pt").write_text("not a checkpoint")
    return root


@pytest.mark.parametrize("cmd,ckpt,extra,msg", [
    ("linear", "convnet.pt", ["--backbone", "resnet18"], "does not match --backbone resnet18"),
    ("knn", "convnet.pt", ["--backbone", "resnet18"], "it is a convnet4 encoder"),
    ("knn", "checkpoint.pt", ["--backbone", "resnet50"], "is a convnet4, not --backbone resnet50"),
    ("linear", "foreign.pt", [], "not a fastbyol checkpoint nor a state_dict"),
    ("knn", "foreign_tensors.pt", [], "not a fastbyol or torchvision checkpoint"),
    ("linear", "foreign_tensors.pt", ["--backbone", "resnet18"], "not a fastbyol or torchvision checkpoint"),
    ("knn", "text.pt", [], "cannot read checkpoint"),
    ("linear", "missing.pt", [], "no checkpoint at"),
])
def test_bad_checkpoints(convnet_files, data, tmp_path, capsys, ckpt, extra, msg, cmd):
    train, val = data
    code, err = _error(capsys, ["eval", cmd, str(convnet_files / ckpt), *extra, *common(train, val, tmp_path)])
    _one_line(code, err, msg)


def _flat(t):
    os.makedirs(t / "flat")
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(t / "flat" / f"{i}.jpg")
    return str(t / "flat")


def _empty_classes(t):
    os.makedirs(t / "empty" / "class0")
    return str(t / "empty")


def _unreadable(t):
    os.makedirs(t / "bad" / "class0")
    for i in range(4):
        (t / "bad" / "class0" / f"{i}.jpg").write_bytes(b"not a jpeg")
    return str(t / "bad")


@pytest.mark.parametrize("cmd", ["linear", "knn"])
@pytest.mark.parametrize("make_train,make_val,msg", [
    (_flat, None, "has no class subfolders"),
    (None, _empty_classes, "holds no images"),
    (None, _unreadable, "holds no readable image"),
])
def test_bad_data(data, tmp_path, capsys, cmd, make_train, make_val, msg):
    train = make_train(tmp_path) if make_train else data[0]
    val = make_val(tmp_path) if make_val else data[1]
    extra = ["--epochs", "1", "--lr", "0.1"] if cmd == "linear" else []
    code, err = _error(capsys, ["eval", cmd, "--random-init", "--backbone", "convnet4", *extra,
                                *common(train, val, tmp_path)])
    _one_line(code, err, msg)


@pytest.mark.parametrize("argv,usage", [
    (["--nonsense"], "see 'fastbyol --help'"),
    (["train", "--nonsense"], "see 'fastbyol train --help'"),
    (["export"], "see 'fastbyol export --help'"),
    (["eval"], "see 'fastbyol eval --help'"),
    (["eval", "linear", "--mode", "fast"], "see 'fastbyol eval linear --help'"),
    (["eval", "knn", "--nonsense"], "see 'fastbyol eval knn --help'"),
])
def test_usage_errors_name_their_command_once(capsys, argv, usage):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and usage in err and "fastbyol fastbyol" not in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- two processes

def _torchrun(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args[:4])} ... exited {res.returncode}:\n{(res.stdout + res.stderr)[-4000:]}")
    return res


def test_sharded_knn_equals_one_process(tmp_path):
    """The monitor's kNN on 2 gloo ranks (uneven shards: 41 readable images, one corrupt)
    equals one process's: same gathered features in the same order, same accuracy."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from eval_worker import knn_record

    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=14, size=(20, 24))
    (tmp_path / "imgs" / "class1" / "zz_corrupt.jpg").write_bytes(b"not a jpeg")
    _torchrun(os.path.join(ROOT, "tests", "eval_worker.py"), str(tmp_path), folder)
    one = knn_record(str(tmp_path / "one"), folder)
    for r in (0, 1):
        two = torch.load(tmp_path / f"rank{r}.pt")
        assert two["knn"] == pytest.approx(one["knn"], abs=1e-9)
        assert torch.equal(two["index"], one["index"]) and torch.equal(two["labels"], one["labels"])
        torch.testing.assert_close(two["feats"], one["feats"], rtol=1e-5, atol=1e-6)
        assert two["unreadable"] == one["unreadable"] == 1


def test_two_process_eval_equals_one_process(data, tmp_path):
    """`torchrun -m fastbyol eval linear` (full protocol, features gathered per batch) and
    `eval knn` on 2 ranks give one process's numbers."""
    train, val = data
    lin = ["eval", "linear", "--random-init", "--backbone", "convnet4", "--mode", "full", "--epochs", "2",
           "--lr", "0.3"]
    knn = ["eval", "knn", "--random-init", "--backbone", "convnet4", "--k", "3,10"]
    for argv in (lin, knn):
        assert main(argv + common(train, val, tmp_path / "one")) == 0
    _torchrun("-m", "fastbyol", *lin, *common(train, val, tmp_path / "two"))
    _torchrun("-m", "fastbyol", *knn, *common(train, val, tmp_path / "two"))
    a, b = (json.load(open(tmp_path / d / "linear_full_random-init.json")) for d in ("one", "two"))
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert b["top1"] == pytest.approx(a["top1"]) and b["top5"] == pytest.approx(a["top5"])
    for ra, rb in zip(a["epochs"], b["epochs"]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    a, b = (json.load(open(tmp_path / d / "knn_random-init.json")) for d in ("one", "two"))
    assert [(r["k"], r["top1"], r["top5"]) for r in a["results"]] == pytest.approx(
        [(r["k"], r["top1"], r["top5"]) for r in b["results"]])
