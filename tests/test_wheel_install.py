"""A regular (non-editable) install provides every command from any folder: the wheel is built,
installed into a fresh virtual environment, and each entry point runs from a temporary
directory, far from the source tree.

The venv sees the machine's packages (``--system-site-packages``: torch is ~5 GB, reinstalling
it would prove nothing about fastbyol), so each command first proves that ``fastbyol`` and
``fastbyol_kernels`` are the wheel's copies, not the checkout's.
"""
import json
import os
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    wheels = base / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), ROOT], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fastbyol-*.whl")
    env_dir = base / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = base / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PATH"] = str(env_dir / "bin") + os.pathsep + env.get("PATH", "")
    return {"python": python, "bin": env_dir / "bin", "cwd": work, "env": env, "venv": str(env_dir)}


def _run(inst, *cmd, timeout=300):
    return subprocess.run(list(cmd), cwd=inst["cwd"], env=inst["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_the_packages_come_from_the_wheel(installed):
    res = _run(installed, installed["python"], "-c",
               "import json, fastbyol, fastbyol_kernels, fastbyol.bench.gpucheck, fastbyol.bench.train; "
               "print(json.dumps([fastbyol.__file__, fastbyol_kernels.__file__]))")
    assert res.returncode == 0, res.stderr[-3000:]
    for path in json.loads(res.stdout):
        assert os.path.realpath(path).startswith(os.path.realpath(installed["venv"])), path


@pytest.mark.parametrize("cmd", [
    ["fastbyol", "--help"], ["fastbyol", "train", "--help"], ["fastbyol", "export", "--help"],
    ["fastbyol", "eval", "knn", "--help"], ["fastbyol", "eval", "linear", "--help"], ["fastbyol", "bench", "--help"],
    ["fastbyol", "gpu-check", "--help"], ["python", "-m", "fastbyol", "--help"],
    ["python", "-m", "fastbyol_kernels.aot", "--help"],
])
def test_every_command_answers_from_any_folder(installed, cmd):
    exe = installed["python"] if cmd[0] == "python" else str(installed["bin"] / cmd[0])
    res = _run(installed, exe, *cmd[1:], timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "usage" in res.stdout.lower()


def test_gpu_check_tiny_runs_from_the_wheel(installed):
    res = _run(installed, str(installed["bin"] / "fastbyol"), "gpu-check", "--tiny", "--parts", "a", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # No source checkout around the installed package: results go to the current folder.
    (report,) = (installed["cwd"] / "fastbyol-results").glob("gpu_check_*/gpu_check.json")
    result = json.loads(report.read_text())
    assert result["parts"]["kernels"]["status"] == "ok"
    assert os.path.realpath(result["stamp"]["fastbyol_from"]).startswith(os.path.realpath(installed["venv"]))
