"""The trainer receives its parts (:mod:`fastbyol.parts`): it builds nothing and calls no method a
subclass may override while it is constructed; the loader counts micro-batches, the trainer
optimizer steps."""
import pytest
import torch

from fastbyol.config import apply_overrides, preset
from fastbyol.parts import build_model, build_parts
from fastbyol.trainer import Trainer

from helpers import make_image_folder


@pytest.fixture(scope="module")
def cfg_for(tmp_path_factory):
    data = make_image_folder(tmp_path_factory.mktemp("partsdata") / "imgs", classes=2, per_class=12)

    def make(out, **over):
        cfg = preset("smoke")
        apply_overrides(cfg, {"data.data": data, "data.loader": "torch", "train.device": "cpu",
                              "train.out": str(out), "train.kernels": "torch", "train.knn_every": 0, **over})
        return cfg

    return make


class Strict(Trainer):
    """Each method a subclass may replace fails if it runs before the trainer exists."""

    def lr_at(self, step):
        raise AssertionError("lr_at called while the trainer was built")

    tau_at = train_micro_batch = save = start_steps = lr_at


def test_the_trainer_runs_the_parts_it_is_given_and_calls_no_override_while_built(cfg_for, tmp_path):
    cfg = cfg_for(tmp_path, **{"dist.grad_accum": 2, "train.batch_size": 8})
    built = []

    def model_factory(device):
        built.append(build_model(cfg, device))
        return built[-1]

    parts = build_parts(cfg, model_factory=model_factory)
    trainer = Strict(cfg, parts)
    assert trainer.model is built[0] and trainer.loader is parts.loader and trainer.engine is parts.engine
    # batch 8 in micro-batches of 4: the loader's len counts micro-batches, the trainer's epoch optimizer steps
    assert parts.loader.batch_size == 4 and len(parts.loader) == len(parts.train_src) // 4
    assert trainer.steps_per_epoch == len(parts.loader) // 2 >= 1


def test_build_parts_draws_the_model_from_the_seed_whatever_is_swapped(cfg_for, tmp_path):
    cfg = cfg_for(tmp_path)
    torch.manual_seed(123)  # build_parts seeds after the checks, before any part is built
    default = build_parts(cfg).model.online.state_dict()
    swapped = build_parts(cfg, loader_factory=lambda src, micro, device, dist: None).model.online.state_dict()
    assert all(torch.equal(default[k], swapped[k]) for k in default)


def test_a_batch_the_ranks_and_accumulation_cannot_split_is_refused_before_anything_is_built(cfg_for, tmp_path):
    cfg = cfg_for(tmp_path / "never", **{"dist.grad_accum": 3, "train.batch_size": 8})
    with pytest.raises(Exception, match="not divisible by world size 1 x dist.grad_accum 3"):
        build_parts(cfg)
    assert not (tmp_path / "never").exists()
