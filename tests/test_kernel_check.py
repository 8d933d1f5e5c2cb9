"""tests/kernel_check.py, the compiled-kernel check a GPU session runs: it passes here under
the interpreter, it fails when a kernel is off, and on a CUDA machine it runs compiled."""
import os
import subprocess
import sys

import pytest
import torch

import kernel_check

HERE = os.path.dirname(os.path.abspath(__file__))


def test_passes_under_the_interpreter(capsys):
    assert kernel_check.main(["--device", "cpu", "--quick"]) == 0
    assert "0 of" in capsys.readouterr().out


def test_fails_when_a_kernel_is_off(monkeypatch, capsys):
    real = kernel_check.check.byol_loss
    monkeypatch.setattr(kernel_check.check, "byol_loss", lambda *xs, **kw: real(*xs, **kw) * 1.001)
    assert kernel_check.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  byol_loss" in out and "FAIL  ema" not in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "kernel_check.py"), "--device", "cuda"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
