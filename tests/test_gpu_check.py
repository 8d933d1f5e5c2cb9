"""``fastbyol gpu-check``: the tiny mode records every part (or why it was skipped), its
fastbyol rows time the trainer's own step, it runs from a plain checkout with nothing
installed, and without CUDA and --tiny it stops with one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fastbyol.bench import gpucheck  # noqa: E402
from fastbyol.bench.gpucheck.settings import PART_NAMES  # noqa: E402


def _count_trainer_steps(monkeypatch):
    from fastbyol.trainer import Trainer

    calls = {"n": 0}
    real = Trainer.train_micro_batch

    def counted(self, batch):
        calls["n"] += 1
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_micro_batch", counted)
    return calls


def _fastbyol_steps(result):
    """Steps the fastbyol rows say they ran (warm-up + timed), over every part, and part h's count."""
    return sum(r["warmup"] + r["timed_steps"] for p in result["parts"].values() for r in p.get("rows", [])
               if str(r.get("mode", "")).startswith("fastbyol") and not r["mode"].endswith("-loader")
               and r.get("status") == "ok" and "warmup" in r) \
        + result["parts"].get("model", {}).get("meta_steps", 0)  # the cost model's, on meta tensors


def _run(tmp_path, *extra):
    code = gpucheck.main(["--tiny", "--in-process", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
                          *extra])
    return code, json.loads((tmp_path / "gpu_check_tiny_cpu" / "gpu_check.json").read_text())


def test_tiny_records_every_part_and_times_the_trainers_step(tmp_path, monkeypatch):
    calls = _count_trainer_steps(monkeypatch)
    code, result = _run(tmp_path)
    assert code == 0, result["failed_parts"]
    assert (tmp_path / "gpu_check_tiny_cpu" / "gpu_check.md").is_file()
    assert (tmp_path / "gpu_check_tiny_cpu" / "gpu_check.png").is_file()  # the e2e rows as bars
    st = result["stamp"]
    assert st["device"] and st["date"] and st["torch"] and "driver" in st
    parts = result["parts"]
    assert set(parts) == set(PART_NAMES) | {"lightly-style", "calibration"}
    for name, p in parts.items():
        assert p["status"] == "ok" or (p["status"].startswith("skipped: ") and len(p["status"]) > 12), (name, p)
    assert parts["kernels"]["status"] == "ok" and parts["kernels"]["failed"] == 0
    assert parts["syncs"]["status"].startswith("skipped: ")  # CUDA only
    assert parts["finite"]["status"] == "ok" and parts["finite"]["failed"] == 0 and len(parts["finite"]["rows"]) == 8
    # The fastbyol rows are the product's step: one Trainer.train_micro_batch call per step they report.
    e2e = {r["mode"]: r for r in parts["e2e-r50"]["rows"]}
    for mode in ("fastbyol", "fastbyol-synthetic", "fastbyol-loader", "lightly-style", "lightly-style-synthetic",
                 "lightly-style-loader"):
        assert e2e[mode]["status"] == "ok" and e2e[mode]["img_s"] > 0 and e2e[mode]["img_s_median"] > 0, e2e[mode]
    assert e2e["fastbyol-loader"]["details"]["step"].startswith("none")  # the loader alone
    assert set(parts["e2e-r50"]["binds"]) >= {"fastbyol", "lightly-style"}
    loader = parts["e2e-r50"]["loader"]
    assert loader["shm_free_mib"] is not None and loader["workers"] <= loader["wanted_workers"]
    assert any(r["benchmark"] == "loss@train-batch" and r["batch"] == 16 for r in parts["micro"]["rows"])
    # The cost model next to this run's measurements, stage by stage (the first GPU run calibrates it).
    calib = {r["stage"]: r for r in parts["calibration"]["rows"]}
    for stage in ("augmentation", "loss", "ema", "compute step"):
        row = calib[stage]
        assert row["modelled H200 ms"] > 0 and row["measured ms"] > 0 and row["measured / modelled"] > 0, row
    assert "train_micro_batch" in e2e["fastbyol"]["details"]["step"]
    assert calls["n"] == _fastbyol_steps(result) > 0
    assert parts["lightly-style"]["rows"][0]["ratio"] > 0
    assert result["headline"].startswith("TINY CPU RUN")
    assert all(t["verdict"] in ("met", "missed") or t["verdict"].startswith("n/a: ") for t in result["targets"])


def test_the_step_count_catches_a_copied_step(tmp_path, monkeypatch):
    """A runner that times its own copy of the step (what bench_train did before) is caught."""
    import fastbyol.bench.train.fastbyol_runner as fr

    def copied_step(self, batch):  # forward, backward, optimizer, EMA: not the trainer's method
        tr = self.trainer
        out = tr.model(batch.view1, batch.view2, online=tr.engine.module)
        tr.engine.backward(out.loss)
        tr.engine.step()
        tr.model.update_target(0.996, "none", "torch")

    monkeypatch.setattr(fr.FastByolRunner, "step", copied_step)
    calls = _count_trainer_steps(monkeypatch)
    code, result = _run(tmp_path, "--parts", "e2e-cifar")
    assert _fastbyol_steps(result) > 0 and calls["n"] != _fastbyol_steps(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_without_cuda_and_tiny_it_says_so_in_one_line(capsys):
    from fastbyol.cli import main

    assert main(["gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastbyol: error: gpu-check needs a CUDA GPU") and "--tiny" in err and "\n" not in err


HIDE = '''import os, sys
root = os.environ["FASTBYOL_PLAIN_CHECKOUT"]
# No installed fastbyol: drop the editable-install finder and every other folder holding the packages.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") == root or not any(
    os.path.exists(os.path.join(p, n)) for n in ("fastbyol", "fastbyol_kernels"))]
'''


def test_runs_from_a_plain_checkout_with_nothing_installed(tmp_path):
    copy = tmp_path / "checkout"
    for d in ("fastbyol", "kernels", "benchmarks"):
        shutil.copytree(os.path.join(ROOT, d), copy / d, ignore=shutil.ignore_patterns("results", "__pycache__"))
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(tmp_path / "hide"), FASTBYOL_PLAIN_CHECKOUT=os.path.realpath(copy))
    probe = subprocess.run([sys.executable, "-c", "import fastbyol_kernels"], cwd=copy, env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "fastbyol_kernels" in probe.stderr  # not importable without the bootstrap
    res = subprocess.run([sys.executable, "-m", "fastbyol", "gpu-check", "--tiny", "--parts", "a",
                          "--out", str(tmp_path / "out")], cwd=copy, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check_tiny_cpu" / "gpu_check.json").read_text())
    assert result["parts"]["kernels"]["status"] == "ok"  # ran in a child process, which bootstrapped too
    assert result["stamp"]["fastbyol_kernels_from"] == os.path.join(os.path.realpath(copy), "kernels")
    assert result["stamp"]["fastbyol_from"] == os.path.join(os.path.realpath(copy), "fastbyol")


def test_a_failing_part_is_a_row_and_the_rest_still_run(tmp_path, monkeypatch):
    from fastbyol.bench.gpucheck import run

    def broken(pc):
        raise RuntimeError("boom")

    monkeypatch.setitem(run.FUNCS, "kernels", broken)
    code, result = _run(tmp_path, "--parts", "a,e")
    assert code == 1 and result["failed_parts"] == ["kernels"]
    assert result["parts"]["kernels"]["status"] == "error: RuntimeError: boom"
    assert result["parts"]["syncs"]["status"].startswith("skipped: ")


def test_a_part_past_its_cap_is_killed_and_reported(tmp_path):
    import argparse

    from fastbyol.bench.gpucheck import run

    args = argparse.Namespace(tiny=True, cache=None)
    res = run._spawn_part("kernels", args, cap=2, scratch=str(tmp_path))  # the child cannot even import torch in 2 s
    assert res["status"] == "timed out at its 2 s cap" and res["seconds"] < 30


def test_the_lightly_style_loop_computes_what_lightly_does():
    """gpu-check's baseline is lightly's example written out in torch: where lightly is installed,
    its momentum update, loss, heads and schedule give the same numbers."""
    pytest.importorskip("lightning_utilities")
    lightly_utils = pytest.importorskip("lightly.models.utils")
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLProjectionHead
    from lightly.utils.scheduler import cosine_schedule

    from fastbyol.bench.train import lightly_style as ls

    torch.manual_seed(0)
    ours, theirs = ls.projection_head(24, 40, 8), BYOLProjectionHead(24, 40, 8)
    theirs.layers.load_state_dict(ours.state_dict())  # same layers, same names
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    a, b = ls.projection_head(24, 40, 8), ls.projection_head(24, 40, 8)
    a2, b2 = ls.projection_head(24, 40, 8), ls.projection_head(24, 40, 8)
    a2.load_state_dict(a.state_dict()), b2.load_state_dict(b.state_dict())
    ls.update_momentum(a, b, 0.9)
    lightly_utils.update_momentum(a2, b2, 0.9)
    for p, q in zip(b.parameters(), b2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    p, z = torch.randn(7, 8), torch.randn(7, 8)
    torch.testing.assert_close(ls.negative_cosine_similarity(p, z), NegativeCosineSimilarity()(p, z))
    for step in (0, 3, 8, 9):
        assert ls.cosine_schedule(step, 10, 0.996, 1) == pytest.approx(cosine_schedule(step, 10, 0.996, 1), abs=1e-15)


def test_sync_counting_counts_the_sync_warnings(monkeypatch):
    """count_syncs turns set_sync_debug_mode('warn') warnings into a count per step and a place
    (the CUDA calls themselves are stubbed: this machine has none)."""
    import warnings

    from fastbyol.bench.gpucheck import train

    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        warnings.warn("called a synchronizing CUDA operation")  # what torch emits in 'warn' mode
        warnings.warn("unrelated")

    r = train.count_syncs(step, 4)
    assert modes == ["warn", "default"]
    assert r["syncs"] == 4 and r["per_step"] == 1.0 and sum(r["where"].values()) == 4
    assert train.count_syncs(lambda: None, 3)["per_step"] == 0


def test_loader_workers_shrink_to_what_dev_shm_holds(tmp_path):
    """A 64 MB /dev/shm cannot hold 16 workers x 4 prefetch x 77 MB batches: fewer workers, said
    in a note, instead of a bus error; timed steps cover at least 3 x workers x prefetch batches."""
    from fastbyol.bench.gpucheck.settings import loader_budget, sustained_steps

    free = os.statvfs(str(tmp_path)).f_bavail * os.statvfs(str(tmp_path)).f_frsize
    batch = 256 * 2 * 3 * 224 * 224  # uint8 views, ResNet-50
    b = loader_budget(16, 4, batch, shm=str(tmp_path))
    assert b["workers"] == min(16, min(free, b["mem_available_gib"] * 2 ** 30) // 2 // (4 * batch))
    huge = loader_budget(16, 4, free, shm=str(tmp_path))  # one batch the size of the free space
    assert huge["workers"] == 0 and "16 -> 0" in huge["note"] and huge["shm_free_mib"] > 0
    assert loader_budget(0, 4, batch, shm=str(tmp_path))["note"] is None
    assert sustained_steps(15, 16, 4) == 192 and sustained_steps(15, 0, 4) == 15


def test_the_finite_part_fails_a_guard_that_misses(monkeypatch):
    """An L2-norm guard (overflows on a huge finite value) is caught by part g."""
    import types

    from fastbyol.bench.gpucheck import finite_check

    monkeypatch.setattr(finite_check, "nonfinite_flag",
                        lambda named: ~torch.isfinite(torch.stack([t.float().norm() for _, t in named])).all())
    pc = types.SimpleNamespace(device=torch.device("cpu"), settings=types.SimpleNamespace(tiny=True),
                               save=lambda partial: None)
    res = finite_check.part_finite(pc)
    assert res["failed"] == 2 and {r["injected"] for r in res["rows"] if r["result"] == "FAIL"} == {"huge finite"}


def test_sustained_score_is_images_over_the_windows_wall_clock():
    """Three fast steps on prefetched batches and one slow one: the median says 100 img/s, the
    window's wall clock (what the loader sustains) 40 / 1.3 s."""
    from fastbyol.bench.train.timing import summarise

    r = summarise([0.1, 0.1, 0.1, 1.0], [1.3], 10, score="wall")
    assert r["img_s"] == pytest.approx(40 / 1.3) and r["img_s_median"] == pytest.approx(100)
    assert summarise([0.1, 0.1, 0.1, 1.0], [1.3], 10)["img_s"] == pytest.approx(100)  # fastbyol bench's default
