"""End to end through the CLI with the fused Triton loss and EMA (interpreted on CPU), in bf16
and fp16 (the local engine: DeepSpeed's fp16 is covered in tests/test_deepspeed.py)."""
import json

import pytest
import torch

from fastbyol.checkpoint import load_checkpoint
from fastbyol.cli import main

from helpers import make_image_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("fused") / "imgs", classes=2, per_class=10)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_kernels_train_end_to_end(data_dir, tmp_path, precision, monkeypatch):
    from fastbyol_kernels import launches

    launched = []
    real = launches.Launch.run
    monkeypatch.setattr(launches.Launch, "run", lambda self, fn=None: (launched.append(self.kernel), real(self, fn))[1])
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--data", data_dir, "--out", str(out), "--train.kernels", "triton",
                 "--train.knn_every", "0", "--train.precision", precision, "--train.batch_size", "8",
                 "--max-steps", "3"]) == 0
    # Each micro-batch ran the fused forward and backward, each applied step the fused EMA
    # (fp16 may skip a step on overflow at GradScaler's first scale: one more micro-batch).
    assert launched.count("loss_fwd") == launched.count("loss_bwd") >= 3 and launched.count("ema_kernel") == 3
    ck = load_checkpoint(str(out))
    assert ck["step"] == 3
    losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert losses and all(0 < x < 8 for x in losses)  # (2 − 2cos) for each of both pairs: in (0, 8)
    assert all(torch.isfinite(v).all() for v in ck["target"].values() if v.is_floating_point())
    assert any(not torch.equal(ck["online"][k], ck["target"][k]) for k in ck["target"] if "weight" in k)
