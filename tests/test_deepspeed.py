"""DeepSpeed on CPU (gloo): config checks, the adapter's step logic, and real two-process runs.

The multi-process tests launch 2 ranks through ``torchrun`` and the ``deepspeed`` launcher.
What a CPU cannot test: NCCL (synchronised BatchNorm runs on gloo: tests/test_sync_batchnorm.py),
DeepSpeed's own fp16 mode (refused on CPU, and refused by fastbyol anyway: fp16 runs as torch
autocast + DeepSpeed's GradScaler, which does run on CPU and is tested with a real overflow).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastbyol.config import preset
from fastbyol.errors import FastByolError

from helpers import make_image_folder

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "ds_worker.py")


# ----------------------------------------------------------------------------- config

def _cfg(name="smoke", **over):
    from fastbyol.config import apply_overrides

    return apply_overrides(preset(name), over).validate()


@pytest.mark.parametrize("world,accum,precision,micro", [(1, 1, "fp32", 16), (2, 1, "bf16", 8), (2, 2, "fp16", 4)])
def test_generated_config_derives_the_micro_batch(world, accum, precision, micro):
    from fastbyol.engines.deepspeed_config import generated_config

    ds = generated_config(_cfg(**{"dist.grad_accum": accum, "train.precision": precision}), world)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16, micro, accum)
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed 0.19 would clip at 1.0
    assert "optimizer" not in ds and "scheduler" not in ds and "fp16" not in ds and "bf16" not in ds
    assert ds["zero_optimization"]["stage"] == 0
    autocast = ds.get("torch_autocast")
    assert (autocast is None) if precision == "fp32" else autocast == {
        "enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision],
        "lower_precision_safe_modules": []}  # fp32 gradient reduction (tests/test_deepspeed_reduce.py)


@pytest.mark.parametrize("world,accum,micro", [(8, 1, 512), (16, 1, 256), (16, 2, 128), (64, 1, 64)])
def test_imagenet_preset_keeps_the_global_batch(world, accum, micro):
    from fastbyol.engines.deepspeed_config import generated_config

    ds = generated_config(_cfg("imagenet-resnet50", **{"dist.grad_accum": accum}), world)
    assert ds["train_batch_size"] == 4096 and ds["train_micro_batch_size_per_gpu"] == micro


def test_indivisible_global_batch_is_refused():
    from fastbyol.engines.deepspeed_config import generated_config

    with pytest.raises(FastByolError, match="not divisible by world size 3"):
        generated_config(_cfg(), 3)


@pytest.mark.parametrize("key,value", [("train_batch_size", 32), ("train_micro_batch_size_per_gpu", 16),
                                       ("gradient_accumulation_steps", 2)])
def test_user_config_batch_numbers_must_agree(key, value):
    from fastbyol.engines.deepspeed_config import merge_user_config

    with pytest.raises(FastByolError) as e:
        merge_user_config({key: value}, _cfg(), 2)
    msg = str(e.value)
    assert key in msg and "global batch 16 = micro-batch 8 x grad-accum 1 x 2 ranks" in msg and "\n" not in msg


def test_user_config_is_completed():
    from fastbyol.engines.deepspeed_config import merge_user_config

    user = {"train_batch_size": "auto", "gradient_accumulation_steps": 1, "steps_per_print": 50,
            "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e7}}
    ds = merge_user_config(user, _cfg(**{"optim.optimizer": "sgd", "train.precision": "bf16"}), 2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["steps_per_print"] == 50 and ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 5e7}
    assert ds["torch_autocast"]["dtype"] == "bfloat16" and ds["gradient_clipping"] == 0.0
    assert user["train_batch_size"] == "auto"  # the caller's dict is not modified


@pytest.mark.parametrize("user,over,msg", [
    ({"fp16": {"enabled": True}}, {}, "remove the 'fp16' section and use --train.precision fp16"),
    ({"bf16": {"enabled": True}}, {}, "remove the 'bf16' section"),
    ({"optimizer": {"type": "Adam"}}, {}, "remove the 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, "remove the 'scheduler' section"),
    ({"zero_optimization": {"stage": 3}}, {"optim.optimizer": "sgd"}, "ZeRO stage 3 partitions the weights"),
    ({"zero_optimization": {"stage": 2}}, {}, "LARS's per-layer trust ratios would become per-partition"),
    ({"zero_optimization": {"stage": 2}}, {"dist.zero_stage": 1, "optim.optimizer": "sgd"}, "disagrees"),
    ({"torch_autocast": {"enabled": True, "dtype": "fp16"}}, {"train.precision": "bf16"}, "disagrees"),
])
def test_user_config_refusals(user, over, msg):
    from fastbyol.engines.deepspeed_config import merge_user_config

    with pytest.raises(FastByolError, match=re.escape(msg)):
        merge_user_config(user, _cfg(**over), 1)


@pytest.mark.parametrize("over,msg", [
    ({"dist.zero_stage": 1}, "ZeRO stage 1 hands the optimizer flat partitions"),
    ({"dist.zero_stage": 2, "optim.optimizer": "sgd", "train.precision": "fp16"}, "fp16 loss scaling"),
])
def test_zero_refusals(over, msg):
    from fastbyol.engines.deepspeed_config import generated_config

    with pytest.raises(FastByolError, match=msg):
        generated_config(_cfg(**over), 2)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_zero_is_allowed_with_elementwise_optimizers(opt):
    from fastbyol.engines.deepspeed_config import generated_config

    ds = generated_config(_cfg(**{"dist.zero_stage": 2, "optim.optimizer": opt, "train.precision": "bf16"}), 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"] is True


def test_ds_config_file_errors(tmp_path):
    from fastbyol.engines.deepspeed_config import deepspeed_config

    with pytest.raises(FastByolError, match="cannot read --dist.ds_config"):
        deepspeed_config(_cfg(**{"dist.ds_config": str(tmp_path / "missing.json")}), 1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FastByolError, match="is not valid JSON"):
        deepspeed_config(_cfg(**{"dist.ds_config": str(tmp_path / "bad.json")}), 1)
    (tmp_path / "ok.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    assert deepspeed_config(_cfg(**{"dist.ds_config": str(tmp_path / "ok.json")}), 2)["train_batch_size"] == 16


# ----------------------------------------------------------------------------- replicas

def _tiny_byol():
    from fastbyol.model import BYOL

    return BYOL("convnet4", projector_hidden=16, predictor_hidden=16, projection_dim=8, loss_fn=lambda *a: 0)


def test_sync_bn_converts_online_and_target_on_any_device():
    from fastbyol.distributed import convert_sync_batchnorm
    from fastbyol.sync_batchnorm import SyncFreeBatchNorm

    model = _tiny_byol()
    names = [n for n, _ in model.target.named_parameters()]
    assert convert_sync_batchnorm(model, 1, True) is False  # one rank
    assert convert_sync_batchnorm(model, 2, False) is False  # --dist.sync_bn false
    assert not any(isinstance(m, SyncFreeBatchNorm) for m in model.modules())
    # Every BatchNorm of both networks, names unchanged; CPU (gloo) included.
    assert convert_sync_batchnorm(model, 2, True) is True
    for net in (model.online, model.target):
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(isinstance(m, SyncFreeBatchNorm) for m in bns)
    assert [n for n, _ in model.target.named_parameters()] == names
    assert not any(p.requires_grad for p in model.target.parameters())
    model.ema("none", "torch").update(0.5)  # online/target still pair by name


class _FakeScaler:
    def __init__(self):
        self.scale, self.reads = 65536.0, 0

    def get_scale(self):
        self.reads += 1
        return self.scale


class _FakeDeepSpeed:
    """Just the DeepSpeed engine calls the adapter's step() makes."""

    def __init__(self, accum, overflow=(), zero_skip=(), optimizer=None):
        self.accum, self.overflow, self.zero_skip = accum, set(overflow), set(zero_skip)
        self.micro, self.applied = 0, False
        self.torch_autocast_z0_gradscaler = _FakeScaler() if overflow else None
        if optimizer is not None:  # a real torch optimizer, stepped unless the scaler skips
            self.optimizer = optimizer

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accum == 0

    def step(self):
        boundary = self.is_gradient_accumulation_boundary()
        self.applied = boundary and self.micro not in self.zero_skip
        if boundary and self.micro in self.overflow:
            self.torch_autocast_z0_gradscaler.scale /= 2  # GradScaler backs off; DeepSpeed still says applied
        elif boundary and self.micro == 5 and self.torch_autocast_z0_gradscaler is not None:
            self.torch_autocast_z0_gradscaler.scale *= 2  # growth after good steps: applied
        if boundary and self.micro not in self.overflow and hasattr(self, "optimizer"):
            self.optimizer.step()
        self.micro += 1

    def was_step_applied(self):
        return self.applied


@pytest.mark.parametrize("kind", ["fp16", "fp16-hooked", "zero"])
def test_step_is_true_only_at_applied_boundaries(kind):
    from fastbyol.engines.deepspeed_engine import DeepSpeedEngine
    from fastbyol.runtime import DistInfo

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1) if kind == "fp16-hooked" else None
    fake = _FakeDeepSpeed(2, overflow=(3,), optimizer=opt) if kind.startswith("fp16") else _FakeDeepSpeed(2, zero_skip=(3,))
    eng = DeepSpeedEngine(fake, None, torch.device("cpu"), "fp16", DistInfo(), False)
    assert [eng.step() for _ in range(8)] == [False, True, False, False, False, True, False, True]
    if kind == "fp16-hooked":  # told by the optimizer's post-step hook: the scale is never read
        assert fake.torch_autocast_z0_gradscaler.reads == 0


def test_resuming_a_single_process_checkpoint_is_refused(tmp_path):
    from fastbyol.checkpoint import atomic_save
    from fastbyol.engines.deepspeed_engine import DeepSpeedEngine
    from fastbyol.runtime import DistInfo

    atomic_save({"online": {}, "step": 3, "optimizer_class": "LARS"}, str(tmp_path / "checkpoint.pt"))
    eng = DeepSpeedEngine(None, None, torch.device("cpu"), "fp32", DistInfo(), False)
    with pytest.raises(FastByolError, match="written by a single-process run"):
        eng.load(str(tmp_path / "checkpoint.pt"))


# ----------------------------------------------------------------------------- two processes

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 40 images, 36 for training: 2 steps per epoch at global batch 16.
    return make_image_folder(tmp_path_factory.mktemp("dsdata") / "imgs", classes=2, per_class=20)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(cmd, timeout=300):
    # The first DeepSpeed init in a fresh environment JIT-builds a comm op (~20-40 s, cached).
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... exited {res.returncode}:\n{(res.stdout + res.stderr)[-4000:]}")
    return res


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def deepspeed_launcher(*args):
    from fastbyol.distributed import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            *args]


def smoke(data, out, *extra):
    return ["--preset", "smoke", "--data", data, "--out", str(out), "--train.kernels", "torch",
            "--train.knn_every", "0", "--train.device", "cpu", "--train.log_every", "100", *extra]


def _assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def test_two_ranks_with_accumulation_match_one_process_and_each_other(data_dir, tmp_path):
    """2 ranks x 2 accumulation steps x micro-batch 4 == 1 process x 4 accumulation steps x 4."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from ds_worker import train_on_fixed_chunks

    from fastbyol.checkpoint import load_checkpoint
    from fastbyol.cli import build_parser, resolve_config
    from fastbyol.runtime import DistInfo

    # Per-rank BatchNorm statistics (no sync): then a rank's micro-batch normalises exactly as
    # the single process's accumulation micro-batch does.
    args = smoke(data_dir, tmp_path / "ds", "--max-steps", "3", "--dist.grad_accum", "2", "--dist.sync_bn", "false",
                 "--train.keep_last", "1")
    _launch(torchrun(WORKER, str(tmp_path), *args))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # Every rank holds the same online and target network, parameters and buffers.
    _assert_same(r0["online_state"], r1["online_state"], rtol=0, atol=0)
    _assert_same(r0["target_state"], r1["target_state"], rtol=0, atol=0)
    # Optimizer steps (and so target updates) happen at accumulation boundaries only.
    assert r0["applied"] == [False, True] * 3 and r0["steps"] == 3
    # The same training on one process: accumulation 4 over the same micro-batches.
    ref_args = smoke(data_dir, tmp_path / "local", "--max-steps", "3", "--dist.grad_accum", "4")
    ref = train_on_fixed_chunks(resolve_config(build_parser().parse_args(["train", *ref_args])), DistInfo(), "local")
    assert ref["applied"] == [False, False, False, True] * 3
    # Parameters agree up to summation order. BatchNorm running statistics do not: one
    # process updates them micro-batch after micro-batch, two ranks each from their own and
    # then average them at the checkpoint, so only parameters are compared.
    for net in ("online_state", "target_state"):
        keys = [k for k in r0[net] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        _assert_same({k: r0[net][k] for k in keys}, {k: ref[net][k] for k in keys}, rtol=1e-5, atol=1e-6)
    # Rank 0's checkpoint: fastbyol's file next to DeepSpeed's folder; export reads it as usual.
    ck = load_checkpoint(str(tmp_path / "ds"))
    assert ck["step"] == 3 and ck["deepspeed"]["tag"] == "step00000003" and ck["deepspeed"]["world_size"] == 2
    assert os.listdir(tmp_path / "ds" / "deepspeed" / "step00000003")
    assert not os.path.exists(tmp_path / "ds" / "deepspeed" / "step00000002")  # older tags removed (keep_last 1)
    _assert_same(ck["online"], r0["online_state"], rtol=0, atol=0)


def test_fused_kernels_bf16_two_ranks_train_without_host_syncs(data_dir, tmp_path):
    """The fused loss and EMA (interpreted) inside 2-process DeepSpeed, bf16 autocast, LARS,
    accumulation 2: trains, ranks agree, and no micro-batch after the first two syncs."""
    args = smoke(data_dir, tmp_path / "run", "--max-steps", "3", "--dist.grad_accum", "2", "--precision", "bf16")
    args[args.index("--train.kernels") + 1] = "triton"
    _launch(torchrun(WORKER, str(tmp_path), "--record-syncs", *args))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["applied"] == [False, True] * 3 and r0["steps"] == 3
    _assert_same(r0["target_state"], r1["target_state"], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(r0["final_target"], r0["initial_target"]))
    assert len(r0["syncs"]) == 4 and r0["syncs"] == r1["syncs"] == [[]] * 4, r0["syncs"]


def test_fp16_overflow_skips_the_step_on_every_rank(data_dir, tmp_path):
    """Rank 0's gradient overflows at the first micro-batch; after the all-reduce both ranks skip:
    no weight update, no target update, no schedule advance; the next steps apply."""
    args = smoke(data_dir, tmp_path / "run", "--max-steps", "2", "--precision", "fp16")
    args[args.index("--train.kernels") + 1] = "triton"  # the fused loss and EMA (interpreted) in fp16
    _launch(torchrun(WORKER, str(tmp_path), "--overflow-at", "0", *args))
    for r in (0, 1):
        rec = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert rec["applied"] == [False, True, True] and rec["steps"] == 2
        assert rec["step_before"] == [0, 0, 1] and rec["lr_before"][1] == rec["lr_before"][0]
        for now, before in zip(rec["online"][0], rec["initial_online"]):
            assert torch.equal(now, before)
        # Snapshots are taken inside engine.step(), before the trainer's target update: the one of
        # call 1 shows the target after whatever followed the skipped call 0, i.e. nothing.
        for now, before in zip(rec["target"][1], rec["initial_target"]):
            assert torch.equal(now, before)
        # The first applied step runs at lr 0 (warm-up starts there); the second moves both networks.
        assert any(not torch.equal(a, b) for a, b in zip(rec["online"][2], rec["initial_online"]))
        assert any(not torch.equal(a, b) for a, b in zip(rec["final_target"], rec["initial_target"]))
        assert rec["scale"] == 2.0 ** 15  # backed off once from 2^16
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    _assert_same(a["online_state"], b["online_state"], rtol=0, atol=0)
    _assert_same(a["target_state"], b["target_state"], rtol=0, atol=0)


def test_cli_launchers_resume_exactly_and_export(data_dir, tmp_path):
    """`deepspeed --module fastbyol train` straight to 4 steps == `torchrun -m fastbyol train` to 2, then
    --resume; then the run goes on with one process instead of two (same global batch)."""
    from fastbyol.checkpoint import load_checkpoint
    from fastbyol.cli import main as cli

    common = ("--epochs", "3", "--dist.grad_accum", "1")
    _launch(deepspeed_launcher("--module", "fastbyol", "train",
                               *smoke(data_dir, tmp_path / "straight", *common, "--max-steps", "4")))
    _launch(torchrun("-m", "fastbyol", "train", *smoke(data_dir, tmp_path / "split", *common, "--max-steps", "2")))
    assert load_checkpoint(str(tmp_path / "split"))["step"] == 2
    _launch(torchrun("-m", "fastbyol", "train", *smoke(data_dir, tmp_path / "split", *common, "--max-steps", "4",
                                                        "--resume", str(tmp_path / "split"))))
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "split"))
    assert a["step"] == b["step"] == 4
    _assert_same(a["online"], b["online"], rtol=0, atol=0)
    _assert_same(a["target"], b["target"], rtol=0, atol=0)
    assert cli(["export", str(tmp_path / "split"), str(tmp_path / "enc.pt")]) == 0
    enc = torch.load(tmp_path / "enc.pt")
    assert enc and all(torch.equal(v, a["online"][f"encoder.{k}"]) for k, v in enc.items())
    # Elastic resume: one process with 2 accumulation steps keeps the global batch of 16, so the
    # schedules and the data position carry over; the run ends with its 3rd epoch.
    one = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "fastbyol",
           "train", *smoke(data_dir, tmp_path / "split", "--epochs", "3", "--dist.grad_accum", "2",
                           "--deepspeed", "true", "--resume", str(tmp_path / "split"))]
    _launch(one)
    c = load_checkpoint(str(tmp_path / "split"))
    assert c["step"] == 6 and c["deepspeed"]["world_size"] == 1
    assert all(torch.isfinite(v).all() for v in c["online"].values() if v.is_floating_point())
    assert any(not torch.equal(c["online"][k], b["online"][k]) for k in b["online"])
