"""No host syncs in steady-state training steps (fastbyol.host_sync records them on CPU).

Driven through ``Trainer.train_micro_batch`` with the fused kernels (interpreter), LARS,
gradient accumulation, the LR/τ schedules and the NaN guard, in fp32, bf16 and fp16; the
DeepSpeed engine is covered by tests/test_deepspeed.py through tests/ds_worker.py.
"""
import pytest
import torch

from fastbyol.config import apply_overrides, preset
from fastbyol.host_sync import record_host_syncs
from fastbyol.trainer import Trainer

from helpers import make_image_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("syncdata") / "imgs", classes=2, per_class=20)


def _trainer(data_dir, out, precision, **over):
    cfg = preset("smoke")
    apply_overrides(cfg, {"data.data": data_dir, "data.loader": "torch", "train.device": "cpu", "train.out": str(out), "train.kernels": "triton",
                          "train.knn_every": 0, "train.precision": precision, "dist.grad_accum": 2,
                          "train.batch_size": 8, **over})
    return Trainer.from_config(cfg)


def steady_state_syncs(trainer, micro_batches=6, warmup=2):
    """Host syncs of ``micro_batches`` micro-batches after ``warmup`` (the batches are read
    first: with workers=0 the loader's host-side work would run inside the recording)."""
    trainer.start_steps()
    it = iter(trainer.loader)
    batches = [next(it) for _ in range(warmup + micro_batches)]
    for batch in batches[:warmup]:  # first calls build caches (EMA block tables, ...)
        trainer.train_micro_batch(batch)
    with record_host_syncs() as syncs:
        stepped = [trainer.train_micro_batch(batch)[1] for batch in batches[warmup:]]
    return syncs, stepped


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-tensor-tau"])
def test_training_steps_do_not_sync(data_dir, tmp_path, precision, monkeypatch):
    trainer = _trainer(data_dir, tmp_path, precision.split("-")[0])
    allowed = []
    if precision.endswith("tensor-tau"):
        # τ as a device tensor, refilled each step (what a CUDA-graph-captured step needs).
        tau, real = torch.zeros((), dtype=torch.float64), trainer.model.update_target
        monkeypatch.setattr(trainer.model, "update_target", lambda t, *a, **kw: real(tau.fill_(t), *a, **kw))
    if precision == "fp16":
        # The scaler starts at 2**16, where this tiny model's first fp16 steps overflow and are
        # skipped (which is correct, but not the steady state this test is about).
        trainer.engine.scaler._init_scale = 2.0 ** 8
    step0 = trainer.step
    syncs, stepped = steady_state_syncs(trainer)
    assert stepped == [False, True] * 3 and trainer.step == step0 + 4  # accumulation 2, all applied
    if precision.endswith("tensor-tau"):
        # ema_update_ checks a *CPU* tensor momentum's value (free on CPU); a CUDA one is not
        # read (the kernel checks it), so on a GPU this read does not exist.
        allowed = [s for s in syncs if s.where.split(":")[0].endswith("ema.py") and "_check_momentum" in s.where]
        assert len(allowed) == 3
    if precision == "fp16":
        # torch's GradScaler reads found-inf once per optimizer step (its step() decides on
        # the host whether to call the optimizer): one read per applied step, nothing else.
        allowed = [s for s in syncs if "grad_scaler.py" in s.stack and s.what == "Tensor.item"]
        assert len(allowed) == 3
    assert [str(s) for s in syncs if s not in allowed] == []


def test_the_recorder_sees_the_syncs_a_step_would_make(data_dir, tmp_path):
    # The recorder is not blind: a log step's loss read, a Python branch on a tensor, a
    # per-call constant upload and a boolean mask each show up, with their line.
    trainer = _trainer(data_dir, tmp_path, "fp32")
    trainer.start_steps()
    batch = next(iter(trainer.loader))
    with record_host_syncs() as syncs:
        out, _ = trainer.train_micro_batch(batch)
        trainer._mean_loss()
        if out.loss > 0:
            pass
        torch.tensor([0.5, 0.5, 0.5], device=out.z.device) * out.z.mean()
        out.z[out.z > 0].sum()
    whats = [s.what for s in syncs]
    assert whats == ["Tensor.item", "Tensor.__bool__", "torch.tensor", "aten.index (boolean mask)"], whats
    assert "trainer.py" in syncs[0].where and "_mean_loss" in syncs[0].where


def test_normalize_builds_its_constants_once():
    from fastbyol.augment import normalize
    from fastbyol.config import AugmentConfig

    cfg, x = AugmentConfig(mean=(0.25, 0.5, 0.75)), torch.rand(2, 3, 4, 4)  # values no other test uses
    with record_host_syncs() as first:
        normalize(x, cfg)
    with record_host_syncs() as syncs:
        y = normalize(x, cfg)
    assert [s.what for s in first] == ["torch.tensor"] * 2 and syncs == []  # built once, then cached
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (x - mean) / std)


def test_generated_deepspeed_config_turns_the_synchronising_timer_off():
    pytest.importorskip("deepspeed")
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.config import get_timers_config
    from deepspeed.utils.timer import ThroughputTimer

    from fastbyol.engines.deepspeed_config import generated_config

    def syncs_of(ds_config):
        timer = ThroughputTimer(get_timers_config(ds_config), batch_size=4, start_step=0)
        with record_host_syncs() as syncs:
            for _ in range(2):
                timer.start()
                timer.stop(global_step=True)
        return [s.what for s in syncs]

    assert len(syncs_of({})) == 4  # DeepSpeed's default: a device synchronize at start and stop
    cfg = preset("smoke")
    assert syncs_of(generated_config(cfg, 2)) == []
    assert generated_config(cfg, 2)["flops_profiler"] == {"enabled": False}
