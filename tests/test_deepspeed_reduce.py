"""DeepSpeed bf16 runs reduce gradients in fp32 (as a local bf16 run keeps them) unless
``--dist.reduce_dtype bf16`` asks for DeepSpeed's bf16 reduction."""
import importlib.util
import os
import sys

import pytest
import torch

from fastbyol.config import apply_overrides, preset
from fastbyol.errors import FastByolError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _cfg(**over):
    return apply_overrides(preset("smoke"), dict({"train.precision": "bf16"}, **over)).validate()


@pytest.mark.parametrize("stage,opt", [(0, "lars"), (2, "sgd")])
def test_generated_config_reduces_in_fp32_by_default(stage, opt):
    from fastbyol.engines.deepspeed_config import generated_config

    ds = generated_config(_cfg(**{"dist.zero_stage": stage, "optim.optimizer": opt}), 2)
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []  # DeepSpeed tags no parameter bf16
    assert ds.get("communication_data_type", "fp32") == "fp32"
    bf16 = generated_config(_cfg(**{"dist.zero_stage": stage, "optim.optimizer": opt, "dist.reduce_dtype": "bf16"}), 2)
    assert "lower_precision_safe_modules" not in bf16["torch_autocast"]  # DeepSpeed's default: Linear, Conv*
    assert bf16.get("communication_data_type") == ("bf16" if stage == 0 else None)


def test_reduce_dtype_refusals():
    from fastbyol.engines.deepspeed_config import merge_user_config

    with pytest.raises(FastByolError, match="dist.reduce_dtype: bf16 needs --train.precision bf16"):
        _cfg(**{"train.precision": "fp32", "dist.reduce_dtype": "bf16"})
    user = {"torch_autocast": {"enabled": True, "dtype": "bfloat16",
                               "lower_precision_safe_modules": ["torch.nn.Linear"]}}
    with pytest.raises(FastByolError, match="lower_precision_safe_modules .*--dist.reduce_dtype bf16"):
        merge_user_config(user, _cfg(), 2)
    assert merge_user_config(user, _cfg(**{"dist.reduce_dtype": "bf16"}), 2)["torch_autocast"][
        "lower_precision_safe_modules"] == ["torch.nn.Linear"]


@pytest.mark.slow  # two DeepSpeed inits on 2 ranks: ~70 s on 2 shared cores
def test_two_ranks_reduce_bf16_gradients_in_fp32_unless_asked(tmp_path):
    """2 gloo ranks, bf16 autocast, LARS, ZeRO 0 (what LARS runs with). The all-reduced
    gradient of a bf16 run is the two ranks' fp32 gradients averaged within fp32 rounding, as
    a local bf16 run's accumulation keeps them; ``--dist.reduce_dtype bf16`` puts bf16 on the
    wire and the average is off by bf16 rounding.

    (Not compared with a local process end to end: on this 4-layer net at 16 px, batch 4, the
    bf16 forward alone moves the update by ~20% between runs that differ in op order, which
    would hide a 2^-9 reduction error.)"""
    import subprocess

    from helpers import make_image_folder
    from test_deepspeed import _env, smoke, torchrun

    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=10)
    args = smoke(data, tmp_path / "unused", "--max-steps", "1", "--precision", "bf16", "--dist.sync_bn", "false",
                 "--train.ckpt_every", "0", "--train.keep_last", "0")
    res = subprocess.run(torchrun(os.path.join(ROOT, "tests", "ds_reduce_worker.py"), str(tmp_path), *args),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    def error(kind):  # |reduced - fp32 mean of the ranks' own gradients| / |mean|, all parameters together
        mean = torch.cat([((a.double() + b.double()) / 2).flatten() for a, b in zip(r0[kind]["before"],
                                                                                   r1[kind]["before"])])
        got = torch.cat([g.double().flatten() for g in r0[kind]["after"]])
        for a, b in zip(r0[kind]["after"], r1[kind]["after"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # every rank holds the same average
        assert all(g.dtype == torch.float32 for g in r0[kind]["after"])
        return float((got - mean).norm() / mean.norm())

    for r in (r0, r1):
        assert "torch.bfloat16" not in r["fp32"]["comm_dtypes"] and "torch.float32" in r["fp32"]["comm_dtypes"]
        assert "torch.bfloat16" in r["bf16"]["comm_dtypes"]
    fp32_err, bf16_err = error("fp32"), error("bf16")
    assert fp32_err < 1e-6, (fp32_err, bf16_err)  # fp32 rounding of one sum
    assert 1e-4 < bf16_err < 1e-2, (fp32_err, bf16_err)  # bf16 keeps 8 significant bits
