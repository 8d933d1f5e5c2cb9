"""``fastbyol train --config FILE`` and the ``config.yaml`` every run writes."""
import json

import pytest
import torch
import yaml

from fastbyol.cli import build_parser, main, resolve_config
from fastbyol.config import config_from_dict, preset

from helpers import make_image_folder, smoke_args


def _resolve(*argv):
    return resolve_config(build_parser().parse_args(["train", *argv]))


def _write(path, tree):
    path.write_text(json.dumps(tree) if path.suffix == ".json" else yaml.safe_dump(tree))
    return str(path)


def test_a_run_writes_its_config_and_the_file_reruns_it(tmp_path):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=10, size=(20, 20))
    run = tmp_path / "run"
    assert main(smoke_args(data, run, "--max-steps", "1", "--optim.base_lr", "0.3",
                           "--augment.crop_scale", "0.3,1")) == 0
    written = run / "config.yaml"
    assert written.read_text().startswith("# The resolved config of this run")
    trained = config_from_dict(torch.load(run / "checkpoint.pt", weights_only=True)["config"])
    assert _resolve("--config", str(written)) == trained
    # ... and it runs: the same settings into a new folder
    assert main(["train", "--config", str(written), "--out", str(tmp_path / "again")]) == 0
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["optim"]["base_lr"] == 0.3


def test_precedence_preset_then_file_then_flags(tmp_path):
    f = _write(tmp_path / "c.yaml", {"preset": "smoke", "optim": {"base_lr": 0.5, "tau_base": 0.9},
                                     "augment": {"view2": {"solarize_p": 0.1}, "crop_scale": [0.2, 1.0]}})
    c = _resolve("--config", f, "--optim.base_lr", "0.7")
    assert c.preset == "smoke" and c.train.batch_size == preset("smoke").train.batch_size  # the file's preset
    assert (c.optim.base_lr, c.optim.tau_base) == (0.7, 0.9)  # the flag over the file, the file over the preset
    assert c.augment.view2.solarize_p == 0.1 and c.augment.crop_scale == (0.2, 1.0)
    assert _resolve("--config", f, "--preset", "default").model.backbone == "convnet4"


def test_json_and_a_file_without_preset(tmp_path):
    f = _write(tmp_path / "c.json", {"train": {"epochs": 3, "max_steps": None}, "data": {"val_fraction": 0.2}})
    c = _resolve("--config", f)
    assert c.preset == "default" and c.train.epochs == 3 and c.data.val_fraction == 0.2


@pytest.mark.parametrize("tree,msg", [
    ({"optim": {"bse_lr": 0.1}}, "unknown config field 'optim.bse_lr'"),
    ({"optimizer": {"base_lr": 0.1}}, "unknown config section 'optimizer'"),
    ({"augment": {"view3": {"hue": 0.1}}}, "unknown config section 'augment.view3'"),
    ({"optim": 3}, "optim must be a mapping"),
    ({"train": {"epochs": 1.5}}, "train.epochs"),
    ({"train": {"epochs": None}}, "train.epochs: null"),
    ({"optim": {"tau_base": 2.0}}, "optim.tau_base"),
    ({"preset": "imagenet-vit"}, "unknown preset"),
])
def test_bad_files_are_one_line_errors(tmp_path, capsys, tree, msg):
    f = _write(tmp_path / "c.yaml", tree)
    assert main(["train", "--config", f, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastbyol: error:") and msg in err and len(err.splitlines()) == 1, err


def test_unreadable_and_malformed_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--print-config"]) == 2
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.yaml" in err[0] and "not valid YAML" in err[1]
