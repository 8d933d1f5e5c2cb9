"""fastbyol bench (fastbyol.bench.train) runs in CPU smoke mode: every fastbyol mode measures a real
throughput, and each peer (lightly, byol-pytorch) is either measured or says why not."""
import json
import math
import os
import sys

import pytest

from fastbyol.bench import train as bench_train  # noqa: E402


def test_bench_train_smoke(tmp_path):
    r = bench_train.main(["--smoke", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    path = tmp_path / "bench_train_cpu_smoke.json"
    assert path.is_file() and (tmp_path / "bench_train_cpu_smoke.md").is_file()
    data = json.loads(path.read_text())
    assert data["stamp"]["device"] and data["stamp"]["torch"] and data["stamp"]["date"]
    rows = {row["mode"]: row for row in data["rows"]}
    assert set(rows) == set(bench_train.MODES)
    for mode in ("fastbyol", "fastbyol-synthetic", "ablate-eager-loss", "ablate-loop-ema", "ablate-loop-lars"):
        row = rows[mode]
        assert row["status"] == "ok", row
        assert row["img_s"] > 0 and math.isfinite(row["img_s"]), row
        assert row["timed_steps"] == 3
    # The full mode is compared to the ceiling measured in the same run.
    assert 0 < rows["fastbyol"]["vs_ceiling"] and math.isfinite(rows["fastbyol"]["data_share"])
    for mode in bench_train.PEERS + ("ablate-torch-loader",):  # DALI needs CUDA: skipped on CPU
        row = rows[mode]
        if row["status"] == "ok":
            assert row["img_s"] > 0 and math.isfinite(row["img_s"])
        else:
            assert row["status"].startswith("skipped: ") and len(row["status"]) > len("skipped: ")
    assert data["scaling_estimate"]["smoke"]["rows"][0]["devices"] == 1
    assert r["rows"] == data["rows"]


def test_fastbyol_bench_passes_options_through(capsys):
    from fastbyol.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])  # a leading option must reach bench_train, not fastbyol's parser
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--smoke" in out and "--scaling" in out and "--batch" in out


def test_bench_train_missing_peers_are_skipped(tmp_path, monkeypatch):
    for name in ["lightly", "byol_pytorch"] + [m for m in sys.modules if m.startswith(("lightly.", "byol_pytorch."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    r = bench_train.main(["--smoke", "--modes", "fastbyol-synthetic,lightly,byol-pytorch", "--steps", "2",
                          "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    rows = {row["mode"]: row for row in r["rows"]}
    assert rows["fastbyol-synthetic"]["status"] == "ok"
    assert rows["lightly"]["status"].startswith("skipped: lightly not importable")
    assert rows["byol-pytorch"]["status"].startswith("skipped: byol-pytorch not installed")
    md = (tmp_path / "bench_train_cpu_smoke.md").read_text().splitlines()
    assert any("PEERS NOT MEASURED: lightly, byol-pytorch" in line for line in md[:6])  # loud, in the headline


@pytest.mark.parametrize("hide_lightly", [False, True])
def test_bench_vs_lightly_smoke(tmp_path, monkeypatch, hide_lightly):
    """One tiny round: fastbyol's modes are measured; lightly's are measured when it is
    installed, otherwise reported as skipped and the verdict says nothing was compared."""
    from fastbyol.bench import vs_lightly as bench_vs_lightly

    if hide_lightly:
        for name in ["lightly"] + [m for m in sys.modules if m.startswith("lightly.")]:
            monkeypatch.setitem(sys.modules, name, None)
    r = bench_vs_lightly.main(["--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1", "--workers", "0",
                               "--no-breakdown", "--out", str(tmp_path)])
    rows = {row["mode"]: row for row in r["rows"]}
    assert rows["fastbyol"]["status"] == "ok" and rows["fastbyol"]["img_s"] > 0
    assert rows["fastbyol-synthetic"]["status"] == "ok"
    assert os.path.exists(r["json"]) and os.path.exists(tmp_path / "vs_lightly_cpu_w0_b4.md")
    if rows["lightly"]["status"] == "ok":
        assert r["ratios"]["end-to-end"]["ratio_median"] > 0
    else:
        assert rows["lightly"]["status"].startswith("skipped") and r["verdict"].startswith("not measured")
    if hide_lightly:
        assert rows["lightly"]["status"] != "ok"
