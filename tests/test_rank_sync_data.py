"""Two ranks on a mostly corrupt folder stay in step, with both loaders.

Before stand-ins (fastbyol.data.substitute), a batch shrank on the rank that met bad files: a
micro-batch of one made BatchNorm raise, and a rank skipping a whole batch left its peer waiting
in a collective. Now every rank runs full micro-batches to the end and the run reports how many
samples were replaced, summed over ranks.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from helpers import make_image_folder
from test_deepspeed import _launch, smoke, torchrun

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.fixture(scope="module")
def mostly_corrupt(tmp_path_factory):
    """2 classes x (6 good + 14 bad) files: 70% unreadable (garbage, and JPEGs cut short)."""
    root = make_image_folder(tmp_path_factory.mktemp("corrupt") / "imgs", classes=2, per_class=6)
    for c in range(2):
        d = os.path.join(root, f"class{c}")
        good = open(os.path.join(d, "000.jpg"), "rb").read()
        for k in range(14):
            data = b"not a jpeg" if k % 2 else good[: len(good) // 3]
            with open(os.path.join(d, f"bad{k:02d}.jpg"), "wb") as fh:
                fh.write(data)
    return root


def _expected_substitutions(cfg, epochs):
    """How many of the samples the two ranks' shards use are bad, summed over ranks and epochs."""
    from fastbyol.data import resolve_sources
    from fastbyol.data.batching import EpochShardSampler

    train, _ = resolve_sources(cfg)
    bad = np.array(["bad" in os.path.basename(f) for f in train.files])
    total = 0
    for rank in range(2):
        sampler = EpochShardSampler(len(train), cfg.train.batch_size // 2, cfg.train.seed, rank, 2)
        for e in range(epochs):
            sampler.epoch = e
            total += int(bad[list(sampler)].sum())
    return total


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_two_ranks_train_to_the_end_on_a_mostly_corrupt_folder(mostly_corrupt, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    from fastbyol.checkpoint import load_checkpoint
    from fastbyol.cli import build_parser, resolve_config

    out = tmp_path / "run"
    args = smoke(mostly_corrupt, out, "--loader", loader, "--epochs", "2", "--workers", "1",
                 "--train.log_every", "1")
    res = _launch(torchrun("-m", "fastbyol", "train", *args))
    cfg = resolve_config(build_parser().parse_args(["train", *args]))
    summary = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])
    assert load_checkpoint(str(out))["step"] == summary["steps"] == 4  # 2 epochs x 2 steps, on both ranks
    expected = _expected_substitutions(cfg, 2)
    assert expected >= 10 and summary["skipped_files"] == expected
    assert "replaced" in res.stderr and "Expected more than 1 value" not in res.stderr
