"""The kernel benchmarks run (CPU smoke mode) and record real timings of equal maths."""
import json
import math
import os
import sys

from fastbyol.bench import ema as bench_ema  # noqa: E402
from fastbyol.bench import loss as bench_loss  # noqa: E402


def _check(result, path):
    data = json.load(open(path))
    assert data["device"] and data["torch"] and data["triton"] and data["date"]
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    for row in result["rows"]:
        assert row["time_us"] > 0 and math.isfinite(row["time_us"])
        if row.get("max_abs_diff") is not None:  # every method computed the same update / loss
            assert row["max_abs_diff"] < 1e-5
    # conftest sets TRITON_INTERPRET=1, so the Triton row runs (under the interpreter)
    assert any("fastbyol" in row["method"] for row in result["rows"])


def test_bench_ema_smoke(tmp_path):
    r = bench_ema.main(["--cpu", "--repeats", "3", "--out", str(tmp_path)])
    _check(r, tmp_path / "ema_cpu.json")


def test_bench_loss_smoke(tmp_path):
    r = bench_loss.main(["--cpu", "--repeats", "2", "--out", str(tmp_path)])
    _check(r, tmp_path / "loss_cpu.json")
