"""fastbyol.bench.feeder runs (smoke sizes), times the product's feeder, and shows reads overlapping."""
import json
import os
import sys

from fastbyol.bench import feeder as bench_feeder  # noqa: E402


def test_bench_feeder_smoke(tmp_path):
    r = bench_feeder.main(["--smoke", "--cores", "0", "--out", str(tmp_path)])  # no pinning of pytest itself
    data = json.load(open(tmp_path / "feeder_cpu_smoke.json"))
    assert data["device"] and data["date"] and data["files"] == 64
    rows = {row["feeder"]: row["img_per_s"] for row in r["rows"]}
    assert len(rows) == 7 and all(v > 0 for v in rows.values())
    # 1 ms per read: 16 threads must overlap the sleeps (serial is capped near 1,000 img/s).
    assert rows["1 ms per read, 1 read thread"] < 1000
    assert r["verdict"]["slow_read_overlap_x"] > 2
