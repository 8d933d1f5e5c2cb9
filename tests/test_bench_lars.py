"""fastbyol.bench.lars runs (CPU smoke mode), records real timings, and compares equal maths."""
import json
import math
import os
import sys

from fastbyol.bench import lars as bench_lars  # noqa: E402


def test_bench_lars_smoke(tmp_path):
    r = bench_lars.main(["--cpu", "--repeats", "3", "--out", str(tmp_path)])
    data = json.load(open(tmp_path / "lars_cpu.json"))
    assert data["device"] and data["torch"] and data["date"] and data["params"] > 0
    for row in r["rows"]:
        assert row["time_us"] > 0 and math.isfinite(row["time_us"])
    methods = [row["method"] for row in r["rows"]]
    assert any(m.startswith("fastbyol") for m in methods) and any(m.startswith("per-parameter") for m in methods)
    assert any(m.startswith("floor") for m in methods)
    # The loop and fastbyol's LARS are the same maths: identical first steps up to rounding.
    for row in r["rows"]:
        if row.get("max_abs_diff") is not None:
            assert row["max_abs_diff"] < 1e-6, row
