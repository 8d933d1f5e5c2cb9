"""Checkpoints that are never bad (issue 14), in process: the whole-state finiteness guard,
safe (weights_only) loading, the resume config check, --resume auto, fresh-run refusal,
metrics trimming, keep_last, and the directory fsync."""
import json
import os
import random

import numpy as np
import pytest
import torch

from fastbyol.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state, write_checkpoint
from fastbyol.cli import main
from fastbyol.errors import FastByolError
from fastbyol.finite import describe_nonfinite, nonfinite_flag, state_tensors

from helpers import make_image_folder, smoke_args


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 36 training images at batch 16: 2 steps per epoch.
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=2, per_class=20)


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def _all_finite(ckpt):
    """Every floating-point tensor of a checkpoint: online, target, optimizer state."""
    tensors = list(ckpt["online"].items()) + list(ckpt["target"].items())
    for i, st in ckpt["optimizer"]["state"].items():
        tensors += [(f"optimizer.{i}.{k}", v) for k, v in st.items() if torch.is_tensor(v)]
    return [k for k, v in tensors if v.is_floating_point() and not torch.isfinite(v).all()]


# ----------------------------------------------------------------------------- the guard

@pytest.mark.parametrize("extra", [("--lr", "1e9", "--epochs", "6"), ("--lr", "1e6", "--max-steps", "10", "--epochs", "6")])
def test_absurd_lr_stops_nonzero_and_keeps_only_finite_checkpoints(data_dir, tmp_path, capsys, extra):
    """The issue's cases: BatchNorm's running_var overflows while the loss stays finite."""
    run = tmp_path / "run"
    code, err = _run(capsys, smoke_args(data_dir, run, "--train.log_every", "1", *extra))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "non-finite training state" in err and "holds" in err and "inf" in err
    assert "the last finite checkpoint is kept" in err
    losses = [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]
    assert losses and all(np.isfinite(losses))  # a loss-only guard would have let these runs through
    names = sorted(os.listdir(run))
    assert "checkpoint.pt" in names
    for name in names:
        if name.endswith(".pt"):
            ck = torch.load(run / name, weights_only=True)
            assert _all_finite(ck) == [], name
    assert main(["export", str(run), str(tmp_path / "enc.pt")]) == 0  # the kept checkpoint exports


def test_a_loss_only_guard_misses_what_the_state_guard_catches(data_dir, tmp_path, capsys, monkeypatch):
    """The same --lr 1e6 run with the state check disabled (the old guard) exits 0 with inf in
    its checkpoint: so the test above fails without the state guard."""
    import fastbyol.trainer as trainer

    monkeypatch.setattr(trainer, "nonfinite_flag", lambda named: torch.zeros((), dtype=torch.bool))
    run = tmp_path / "run"
    assert main(smoke_args(data_dir, run, "--lr", "1e6", "--max-steps", "10", "--epochs", "6")) == 0
    bad = _all_finite(load_checkpoint(str(run)))
    assert bad and any("running_var" in k for k in bad)
    code, err = _run(capsys, ["export", str(run), str(tmp_path / "enc.pt")])
    assert code == 2 and "refusing to export a non-finite encoder" in err and "running_var" in err
    assert not os.path.exists(tmp_path / "enc.pt")


@pytest.mark.parametrize("where", ["online.encoder", "bn", "target", "optimizer"])
def test_guard_covers_every_part_of_the_state(where):
    from fastbyol.model import BYOL
    from fastbyol.optim import build_optimizer
    from fastbyol.config import preset

    model = BYOL("convnet4", projector_hidden=16, predictor_hidden=16, projection_dim=8)
    opt = build_optimizer(model.online, preset("smoke").optim, 0.1)
    model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)).loss.backward()
    opt.step()
    named = state_tensors(model.online, model.target, opt)
    assert not bool(nonfinite_flag(named)) and describe_nonfinite(named) is None
    assert any(n.startswith("optimizer.") for n, _ in named) and any(n.endswith("running_var") for n, _ in named)
    pick = {"online.encoder": lambda n: n.startswith("online.encoder") and n.endswith("weight"),
            "bn": lambda n: n.startswith("online.") and n.endswith("running_var"),
            "target": lambda n: n.startswith("target.") and n.endswith("bias"),
            "optimizer": lambda n: n.startswith("optimizer.")}[where]
    name, t = next((n, t) for n, t in named if pick(n))
    t.view(-1)[1] = float("nan")
    t.view(-1)[0] = 1e38  # a huge finite value is not flagged (an L2 norm would overflow on it)
    flag = nonfinite_flag(state_tensors(model.online, model.target, opt))
    assert torch.is_tensor(flag) and bool(flag)
    msg = describe_nonfinite(state_tensors(model.online, model.target, opt))
    assert msg.startswith(f"{name} holds 1 NaN of {t.numel()} values")


# ----------------------------------------------------------------------------- safe loading

def test_checkpoints_load_with_weights_only_and_rng_round_trips(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(smoke_args(data_dir, run, "--max-steps", "2")) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert isinstance(ck["config"], dict) and ck["step"] == 2
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    atomic_save(rng_state(), str(tmp_path / "rng.pt"))
    want = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == want


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("cmd", ["resume", "export"])
def test_a_pickled_checkpoint_is_refused_in_one_line(data_dir, tmp_path, capsys, cmd):
    run = tmp_path / "run"
    os.makedirs(run)
    torch.save({"online": {}, "step": 1, "rng": {"numpy": np.random.get_state()}, "x": Payload()},
               run / "checkpoint.pt")
    argv = (smoke_args(data_dir, run, "--resume", str(run)) if cmd == "resume"
            else ["export", str(run), str(tmp_path / "enc.pt")])
    code, err = _run(capsys, argv)
    assert code == 2 and len(err.splitlines()) == 1 and "holds pickled Python objects" in err
    assert "pwned" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- resume rules

def test_resume_refuses_result_changing_settings_unless_overridden(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(smoke_args(data_dir, run, "--max-steps", "1", "--epochs", "3")) == 0
    before = open(run / "checkpoint.pt", "rb").read()
    code, err = _run(capsys, smoke_args(data_dir, run, "--resume", str(run), "--epochs", "4", "--seed", "1",
                                        "--batch-size", "8", "--augment.view2.solarize_p", "0.5"))
    assert code == 2 and len(err.splitlines()) == 1
    for diff in ("train.epochs 3 -> 4", "train.seed 0 -> 1", "train.batch_size 16 -> 8",
                 "augment.view2.solarize_p 0.2 -> 0.5"):
        assert diff in err
    assert "--train.resume_override" in err
    code, err = _run(capsys, smoke_args(data_dir, run, "--resume", str(run), "--epochs", "4", "--seed", "1",
                                        "--train.resume_override", "train.epochs"))  # not all of them
    assert code == 2 and "train.seed 0 -> 1" in err and "train.epochs" not in err.split("override")[0]
    assert open(run / "checkpoint.pt", "rb").read() == before
    # Harmless settings change freely; an override names the rest.
    assert main(smoke_args(data_dir, run, "--resume", "auto", "--epochs", "4", "--seed", "1", "--max-steps", "2",
                           "--train.resume_override", "train.epochs,train.seed", "--train.log_every", "7",
                           "--workers", "1", "--train.ckpt_every_steps", "1", "--train.keep_last", "1")) == 0
    ck = load_checkpoint(str(run))
    assert ck["step"] == 2 and ck["config"]["train"]["seed"] == 1


def test_fresh_run_into_a_checkpoint_folder_is_refused(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(smoke_args(data_dir, run, "--max-steps", "1")) == 0
    before = open(run / "checkpoint.pt", "rb").read()
    metrics = open(run / "metrics.jsonl").read()
    code, err = _run(capsys, smoke_args(data_dir, run, "--max-steps", "2"))
    assert code == 2 and "already holds a checkpoint" in err and "--resume auto" in err and "new --out" in err
    other = tmp_path / "other"
    assert main(smoke_args(data_dir, other, "--max-steps", "1")) == 0
    code, err = _run(capsys, smoke_args(data_dir, run, "--resume", str(other)))
    assert code == 2 and "would overwrite it" in err
    assert open(run / "checkpoint.pt", "rb").read() == before and open(run / "metrics.jsonl").read() == metrics


def test_resume_auto_and_metrics_trimmed_to_the_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--epochs", "3", "--train.log_every", "1", "--resume", "auto"]
    assert main(smoke_args(data_dir, run, *common, "--max-steps", "3")) == 0  # auto on an empty folder: fresh
    with open(run / "metrics.jsonl", "a") as fh:  # what a run killed after step 3's checkpoint leaves behind
        for step in (4, 5):
            fh.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
    assert main(smoke_args(data_dir, run, *common)) == 0
    steps = [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    straight = tmp_path / "straight"
    assert main(smoke_args(data_dir, straight, "--epochs", "3", "--train.log_every", "1")) == 0
    a, b = load_checkpoint(str(run)), load_checkpoint(str(straight))
    for net in ("online", "target"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), k


def test_fresh_run_starts_a_fresh_metrics_file(data_dir, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 0.0}) + "\n")  # killed before any checkpoint
    assert main(smoke_args(data_dir, run, "--max-steps", "1")) == 0
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [1]


# ----------------------------------------------------------------------------- files

def test_keep_last_and_step_cadence(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(smoke_args(data_dir, run, "--epochs", "3", "--train.ckpt_every_steps", "1", "--train.ckpt_every", "0",
                           "--train.keep_last", "2")) == 0
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == [
        "checkpoint-00000005.pt", "checkpoint-00000006.pt", "checkpoint.pt"]
    assert os.path.samefile(run / "checkpoint.pt", run / "checkpoint-00000006.pt")
    assert load_checkpoint(str(run / "checkpoint-00000005.pt"))["step"] == 5
    zero = tmp_path / "zero"
    assert main(smoke_args(data_dir, zero, "--max-steps", "3", "--train.keep_last", "0")) == 0
    assert sorted(f for f in os.listdir(zero) if f.endswith(".pt")) == ["checkpoint.pt"]


def test_keep_last_keeps_later_steps_of_an_abandoned_branch(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    for step in (1, 2, 3, 9):
        write_checkpoint({"step": step}, path, keep_last=2)
    assert write_checkpoint({"step": 4}, path, keep_last=2) == [3, 4, 9]
    assert torch.load(path, weights_only=True)["step"] == 4


def test_atomic_save_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}") and os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_save({"a": torch.ones(2)}, str(tmp_path / "x.pt"))
    assert synced[0] is False and synced[-1] == os.path.realpath(tmp_path)
    assert not os.path.exists(tmp_path / "x.pt.tmp")


@pytest.mark.parametrize("field,value", [("train.keep_last", "-1"), ("train.ckpt_every_minutes", "-1"),
                                         ("train.ckpt_every_steps", "-2"), ("train.stop_check_every", "0")])
def test_checkpoint_fields_are_validated(capsys, field, value):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["train", "--preset", "smoke", f"--{field}", value]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and field in err


def test_no_config_in_checkpoint_is_refused(tmp_path):
    from fastbyol.resume import check_resume_config

    with pytest.raises(FastByolError, match="holds no config"):
        check_resume_config(None, {}, None, "x")


def test_deepspeed_files_are_read_with_weights_only(tmp_path):
    """DeepSpeed's own loader unpickles with weights_only=False; the engine swaps it for a safe one."""
    import types

    from fastbyol.engines.deepspeed_engine import DeepSpeedEngine
    from fastbyol.runtime import DistInfo

    tag = tmp_path / "deepspeed" / "step00000001"
    tag.mkdir(parents=True)
    torch.save({"module": {}, "x": Payload()}, tag / "mp_rank_00_model_states.pt")

    class FakeOpt:
        pass

    class FakeDeepSpeed:
        basic_optimizer = FakeOpt()
        checkpoint_engine = types.SimpleNamespace(load=lambda p, map_location=None: torch.load(p, weights_only=False))

        def load_checkpoint(self, folder, tag, **kw):  # as DeepSpeed does: through its checkpoint engine
            return self.checkpoint_engine.load(os.path.join(folder, tag, "mp_rank_00_model_states.pt")), {}

    state = {"deepspeed": {"dir": "deepspeed", "tag": "step00000001", "world_size": 1},
             "optimizer_class": "deepspeed:FakeOpt"}
    eng = DeepSpeedEngine(FakeDeepSpeed(), None, torch.device("cpu"), "fp32", DistInfo(), False)
    with pytest.raises(FastByolError, match="holds pickled Python objects"):
        eng.load(str(tmp_path / "checkpoint.pt"), state)
