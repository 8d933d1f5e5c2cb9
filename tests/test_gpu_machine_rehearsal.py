"""The GPU machine's rehearsal: `python -m fastbyol gpu-check --tiny` from a plain checkout in an
environment with exactly that machine's versions (torch 2.11, torchvision 0.26, triton 3.6, the
newest numpy, pillow; no DALI, no DeepSpeed, no install of the project).

The environment is a venv under ``~/.cache/fastbyol-ci/venv-h200`` (``FASTBYOL_CI_CACHE``
moves it), built once and reused: a cold build downloads torch 2.11's CUDA wheel and its
CUDA libraries (the registry has no CPU build of 2.11), ~4.7 GB, ~3.5 min here. Marked
``rehearsal``: deselected by default, run by ``.ci/run`` as its own step
(``pytest -m rehearsal``).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = ["torch==2.11.*", "torchvision==0.26.*", "triton==3.6.*", "numpy", "pillow"]
VERSIONS = {"torch": "2.11.", "torchvision": "0.26.", "triton": "3.6."}

pytestmark = pytest.mark.rehearsal


def _venv() -> str:
    root = os.environ.get("FASTBYOL_CI_CACHE") or os.path.expanduser("~/.cache/fastbyol-ci")
    venv = os.path.join(root, "venv-h200")
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, "fastbyol-pins.json")
    if os.path.isfile(stamp):
        with open(stamp) as fh:
            if json.load(fh) == PINS:
                return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    # --upgrade: the newest numpy the pins allow (the GPU machine's is recent: >= 2.4)
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", *PINS], check=True, timeout=3000)
    with open(stamp, "w") as fh:
        json.dump(PINS, fh)
    return python


def test_gpu_check_tiny_passes_with_the_gpu_machines_versions(tmp_path):
    python = _venv()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    got = json.loads(subprocess.run(
        [python, "-c", "import json, torch, torchvision, triton, numpy; print(json.dumps({m.__name__: m.__version__ "
         "for m in (torch, torchvision, triton, numpy)}))"], env=env, capture_output=True, text=True, check=True).stdout)
    for name, prefix in VERSIONS.items():
        assert got[name].startswith(prefix), got
    for absent in ("fastbyol", "nvidia.dali", "deepspeed"):  # the machine has none of them installed
        probe = subprocess.run([python, "-c", f"import {absent}"], cwd=str(tmp_path), env=env, capture_output=True)
        assert probe.returncode != 0, f"{absent} is importable in the rehearsal venv"
    copy = tmp_path / "checkout"
    for d in ("fastbyol", "kernels", "benchmarks"):
        if os.path.isdir(os.path.join(ROOT, d)):
            shutil.copytree(os.path.join(ROOT, d), copy / d, ignore=shutil.ignore_patterns("results", "__pycache__"))
    res = subprocess.run([python, "-m", "fastbyol", "gpu-check", "--tiny", "--out", str(tmp_path / "out"),
                          "--cache", str(tmp_path / "cache")], cwd=copy, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu_check_tiny_cpu" / "gpu_check.json").read_text())
    assert result["stamp"]["torch"].startswith("2.11.") and result["stamp"]["triton"].startswith("3.6.")
    assert result["parts"]["kernels"]["status"] == "ok" and result["parts"]["kernels"]["failed"] == 0
