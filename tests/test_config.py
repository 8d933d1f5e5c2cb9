import pytest

from fastbyol.config import PRESETS, apply_overrides, config_from_dict, preset
from fastbyol.errors import FastByolError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    preset(name).validate()


def test_imagenet_preset_is_the_paper():
    c = preset("imagenet-resnet50")
    assert (c.model.backbone, c.optim.optimizer, c.optim.base_lr, c.optim.weight_decay) == ("resnet50", "lars", 0.2, 1.5e-6)
    assert (c.optim.warmup_epochs, c.optim.tau_base, c.train.batch_size) == (10, 0.996, 4096)
    assert (c.model.projector_hidden, c.model.projection_dim) == (4096, 256)
    v1, v2 = c.augment.view1, c.augment.view2
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert c.augment.blur_kernel_size == 23


def test_overrides_parse_types_and_reject_unknown():
    c = apply_overrides(preset("smoke"), {"optim.base_lr": "0.3", "augment.crop_scale": "0.2,1", "train.max_steps": "5",
                                          "model.use_momentum": "false"})
    assert c.optim.base_lr == 0.3 and c.augment.crop_scale == (0.2, 1.0) and c.train.max_steps == 5
    assert c.model.use_momentum is False
    with pytest.raises(FastByolError, match="unknown config field 'optim.nope'"):
        apply_overrides(preset("smoke"), {"optim.nope": "1"})
    with pytest.raises(FastByolError, match="optim.base_lr"):
        apply_overrides(preset("smoke"), {"optim.base_lr": "fast"})


@pytest.mark.parametrize("field,value,msg", [
    ("optim.tau_base", "1.5", "optim.tau_base"),
    ("augment.view2.solarize_p", "2", "augment.view2.solarize_p"),
    ("train.precision", "fp8", "train.precision"),
    ("train.batch_size", "1", "train.batch_size"),
    ("model.backbone", "vgg", "model.backbone"),
])
def test_validation_names_the_bad_field(field, value, msg):
    with pytest.raises(FastByolError, match=msg):
        apply_overrides(preset("smoke"), {field: value}).validate()


def test_unknown_preset():
    with pytest.raises(FastByolError, match="unknown preset"):
        preset("imagenet-vit")


def test_config_round_trips_through_dict():
    c = apply_overrides(preset("cifar10-resnet18"), {"optim.base_lr": "0.5"})
    c2 = config_from_dict(c.to_dict())
    assert c2 == c


def test_a_field_added_after_the_checkpoint_reads_as_its_default():
    from fastbyol.config import preset
    from fastbyol.resume import config_differences

    new = preset("smoke").to_dict()
    old = preset("smoke").to_dict()
    del old["dist"]["reduce_dtype"]  # a checkpoint written before the field existed
    assert config_differences(old, new) == []
    new["dist"]["reduce_dtype"] = "bf16"
    assert [d[0] for d in config_differences(old, new)] == ["dist.reduce_dtype"]
