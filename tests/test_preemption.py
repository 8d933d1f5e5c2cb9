"""Preemption, for real: training subprocesses stopped by SIGTERM and Ctrl-C, killed with SIGKILL
at random moments and in the middle of a checkpoint write, then resumed with ``--resume auto``
until they end bitwise equal to an uninterrupted run (local engine; the DeepSpeed ones are in
test_preemption_deepspeed.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastbyol.checkpoint import SLOW_SAVE_ENV, load_checkpoint
from fastbyol.cli import main

from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12  # 6 epochs of 2 steps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=2, per_class=20)


def args(data, out, *extra):
    return ["train", "--preset", "smoke", "--data", data, "--out", str(out), "--train.kernels", "torch",
            "--train.knn_every", "0", "--epochs", "6", "--train.log_every", "1", *extra]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """The uninterrupted run every test must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(args(data_dir, out)) == 0
    return load_checkpoint(str(out))


class Run:
    """``python -m fastbyol ARGV`` (or ``python ARGV`` with ``module=False``: a launcher) in a
    subprocess of its own session, its output read line by line."""

    def __init__(self, argv, env=None, module=True):
        e = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        # The straight run is in this process: same thread count here, or the float sums differ.
        e.update(OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
                 PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), **(env or {}))
        cmd = [sys.executable, *(["-m", "fastbyol"] if module else []), *argv]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=e, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lines = []

    def wait_for(self, text, timeout=120):
        """Read until a line contains ``text``; False if the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                return False
            self.lines.append(line)
            if text in line:
                return True
        raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout=120):
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return self.proc.returncode, "".join(self.lines)


def assert_equal_to(straight, out):
    ck = load_checkpoint(str(out))
    assert ck["step"] == STEPS
    for net in ("online", "target"):
        for k, v in straight[net].items():
            assert torch.equal(v, ck[net][k]), f"{net}.{k}"
    for i, st in straight["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ck["optimizer"]["state"][i][k]), f"optimizer {i}.{k}"
    steps = [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # metrics trimmed at every resume: no step twice


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(data_dir, straight, tmp_path):
    out = tmp_path / "run"
    # With loader worker processes, and to the whole process group, as a scheduler sends it: the
    # workers must survive it until the step is done (and the views must not depend on --workers).
    run = Run(args(data_dir, out, "--resume", "auto", "--train.ckpt_every", "0", "--workers", "2"))
    assert run.wait_for(f"step 3/{STEPS}")
    os.killpg(run.proc.pid, signal.SIGTERM)
    code, text = run.finish()
    assert code == 143, text[-2000:]
    stop = [x for x in text.splitlines() if "stopped by SIGTERM" in x]
    assert len(stop) == 1 and stop[0].startswith("fastbyol: ") and "--resume auto" in stop[0]
    step = int(stop[0].split("after step ")[1].split(":")[0])
    assert 3 <= step < STEPS and load_checkpoint(str(out))["step"] == step  # ckpt_every 0: only the SIGTERM one
    assert main(args(data_dir, out, "--resume", "auto")) == 0
    assert_equal_to(straight, out)


def test_ctrl_c_checkpoints_and_a_second_one_exits_at_once(data_dir, straight, tmp_path):
    out = tmp_path / "run"
    run = Run(args(data_dir, out, "--resume", "auto"))
    assert run.wait_for(f"step 3/{STEPS}")
    run.proc.send_signal(signal.SIGINT)
    code, text = run.finish()
    assert code == 130 and "stopped by SIGINT" in text, text[-2000:]
    step = load_checkpoint(str(out))["step"]
    before = open(out / "checkpoint.pt", "rb").read()
    # Again, with a checkpoint write that hangs half-way: the second Ctrl-C does not wait for it.
    run = Run(args(data_dir, out, "--resume", "auto"), env={SLOW_SAVE_ENV: "60"})
    assert run.wait_for(f"step {step + 1}/{STEPS}")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait_for("fastbyol-test: mid-write")
    time.sleep(1.2)  # a second Ctrl-C within a second counts as the same one (torchrun forwards it)
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    code, text = run.finish()
    assert code == 130 and "second Ctrl-C" in text and time.monotonic() - t0 < 10, text[-2000:]
    assert open(out / "checkpoint.pt", "rb").read() == before  # the interrupted write touched only a .tmp
    assert main(args(data_dir, out, "--resume", "auto")) == 0
    assert_equal_to(straight, out)


def test_kill_9_in_the_middle_of_a_checkpoint_write(data_dir, straight, tmp_path):
    out = tmp_path / "run"
    every = ("--train.ckpt_every_steps", "1", "--train.keep_last", "0")  # writes go straight to checkpoint.pt.tmp
    assert main(args(data_dir, out, *every, "--max-steps", "2")) == 0
    run = Run(args(data_dir, out, "--resume", "auto", *every), env={SLOW_SAVE_ENV: "60"})
    assert run.wait_for("fastbyol-test: mid-write")
    run.proc.kill()
    code, _ = run.finish()
    assert code == -signal.SIGKILL
    assert os.path.getsize(out / "checkpoint.pt.tmp") > 0  # half a checkpoint, never renamed
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main(args(data_dir, out, "--resume", "auto", *every)) == 0
    assert_equal_to(straight, out)


def test_kill_9_at_random_moments(data_dir, straight, tmp_path):
    rng = random.Random(int(os.environ.get("FASTBYOL_TEST_SEED", "14")))
    out = tmp_path / "run"
    every = ("--resume", "auto", "--train.ckpt_every_steps", "1")
    kills = 0
    for _ in range(3):
        run = Run(args(data_dir, out, *every))
        if not run.wait_for("step "):
            break  # finished before the first progress line
        time.sleep(rng.uniform(0.0, 0.6))
        run.proc.kill()
        code, text = run.finish()
        if code == 0:
            break
        assert code == -signal.SIGKILL, text[-2000:]
        kills += 1
    assert kills >= 1
    assert main(args(data_dir, out, *every)) == 0
    assert_equal_to(straight, out)


def _agreement_worker(rank, port, path, every):
    import torch.distributed as tdist

    from fastbyol.stop import StopAgreement

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    agree = StopAgreement(2, torch.device("cpu"), every)
    seen = []
    for step in range(1, 40):
        # Rank 1 alone is signalled, at step 7; rank 0 alone finds a timed checkpoint due from step 3 on.
        stop, due = agree.poll(step, stop=143 if rank == 1 and step >= 7 else 0, due=rank == 0 and step >= 3)
        seen.append((step, stop, due))
        if stop:
            break
    torch.save(seen, f"{path}.{rank}")
    tdist.destroy_process_group()


@pytest.mark.parametrize("every", [2])
def test_ranks_agree_on_the_stop_step(tmp_path, every):
    """Two gloo processes signalled at different times stop at the same step, and a timed
    checkpoint one rank asks for is taken by both, at the same step, once per request."""
    import torch.multiprocessing as mp

    from fastbyol.distributed import free_port

    mp.spawn(_agreement_worker, args=(free_port(), str(tmp_path / "seen"), every), nprocs=2, join=True)
    a, b = (torch.load(f"{tmp_path / 'seen'}.{r}") for r in (0, 1))
    assert a == b
    stops = [s for s, stop, _ in a if stop]
    assert a[-1][1] == 143  # rank 0, never signalled, learns which signal to report
    assert stops == [a[-1][0]] and 7 < stops[0] <= 7 + 2 * every and stops[0] % every == 0
    dues = [s for s, _, due in a if due]
    assert dues and dues[0] == (3 + 2 * every - 1) // every * every and all(s % every == 0 for s in dues)
    if every > 1:  # a granted request is not asked again at the next check (no double checkpoint)
        assert all(b_ - a_ >= 2 * every for a_, b_ in zip(dues, dues[1:]))
