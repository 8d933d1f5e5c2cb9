"""Preemption under DeepSpeed with 2 gloo processes: kill -9 of one rank, SIGTERM to the launcher
(every rank checkpoints at the same step), resume with ``--resume auto`` ending bitwise equal to
an uninterrupted run; slower: resume at another world size, and a two-node launch on one machine
(``torchrun --nnodes 2 --node_rank N`` with a rendezvous on 127.0.0.1)."""
import importlib.util
import os
import signal

import pytest
import torch

from fastbyol.checkpoint import load_checkpoint

from helpers import make_image_folder
from test_preemption import Run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dsdata") / "imgs", classes=2, per_class=20)


def train_args(data, out, *extra):
    return ["train", "--preset", "smoke", "--data", data, "--out", str(out), "--train.kernels", "torch",
            "--train.knn_every", "0", "--train.device", "cpu", "--epochs", "6", "--train.log_every", "1",
            "--train.stop_check_every", "1", *extra]


def torchrun(*argv, nproc=2):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "fastbyol", *argv]


class Launch(Run):
    """A launcher (``python -m torch.distributed.run ...``) in a subprocess."""

    def __init__(self, argv, env=None):
        super().__init__(argv, env=env, module=False)

    def worker(self, rank: int) -> int:
        """The pid of the worker process with RANK=rank."""
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "fastbyol" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        raise AssertionError(f"no worker with RANK={rank}")


def launch_ok(argv, timeout=300):
    run = Launch(argv)
    code, text = run.finish(timeout)
    assert code == 0, text[-4000:]
    return text


def assert_same_weights(a, b):
    for net in ("online", "target"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_straight") / "run"
    launch_ok(torchrun(*train_args(data_dir, out)))
    return load_checkpoint(str(out))


def test_kill_one_rank_then_sigterm_the_launcher_then_resume_exactly(data_dir, straight, tmp_path):
    out = tmp_path / "run"
    common = train_args(data_dir, out, "--resume", "auto", "--train.ckpt_every_steps", "2")
    # 1. kill -9 of rank 1 mid-run: the launcher tears the job down; the last checkpoint stays good.
    run = Launch(torchrun(*common))
    assert run.wait_for(f"step 5/{STEPS}")
    os.kill(run.worker(1), signal.SIGKILL)
    code, text = run.finish()
    assert code != 0
    first = load_checkpoint(str(out))
    assert 4 <= first["step"] < STEPS and first["deepspeed"]["world_size"] == 2
    # 2. resume, then SIGTERM to the launcher (what a scheduler sends): both ranks agree on a step,
    #    checkpoint it together, and exit 143.
    run = Launch(torchrun(*common))
    assert run.wait_for(f"step {first['step'] + 1}/{STEPS}")
    os.kill(run.proc.pid, signal.SIGTERM)
    code, text = run.finish()
    stopped = [x for x in text.splitlines() if "fastbyol: stopped by SIGTERM" in x]
    assert stopped, text[-4000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    second = load_checkpoint(str(out))
    assert second["step"] == step and first["step"] < step < STEPS
    tag = os.path.join(out, "deepspeed", second["deepspeed"]["tag"])
    assert os.listdir(tag)
    # 3. resume to the end: bitwise equal to the run nobody interrupted.
    launch_ok(torchrun(*common))
    final = load_checkpoint(str(out))
    assert final["step"] == STEPS
    assert_same_weights(final, straight)


@pytest.mark.slow
def test_resume_at_another_world_size(data_dir, straight, tmp_path):
    """Stopped on 2 ranks, resumed on 1 process with 2 accumulation steps (same global batch)."""
    out = tmp_path / "run"
    run = Launch(torchrun(*train_args(data_dir, out, "--resume", "auto")))
    assert run.wait_for(f"step 5/{STEPS}")
    os.kill(run.proc.pid, signal.SIGTERM)
    code, text = run.finish()
    step = load_checkpoint(str(out))["step"]
    assert 5 <= step < STEPS, text[-3000:]
    launch_ok(torchrun(*train_args(data_dir, out, "--resume", "auto", "--dist.grad_accum", "2", "--deepspeed", "true"), nproc=1))
    final = load_checkpoint(str(out))
    assert final["step"] == STEPS and final["deepspeed"]["world_size"] == 1
    # Step k trains on the same images at either world size, but BatchNorm normalises over other
    # groups of them (a rank's micro-batch vs an accumulation micro-batch), so the weights are not
    # comparable with the 2-rank run (tests/test_deepspeed.py aligns the groups to compare them).
    # What must hold: the run continued from the checkpoint, on the same schedules, to the end.
    import json

    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, STEPS + 1))
    assert recs[-1]["lr"] == 0.0 and all(torch.isfinite(v).all() for v in final["online"].values()
                                         if v.is_floating_point())


def two_nodes(argv, port):
    """Two single-process "nodes" on this machine: node ranks 0 and 1, local rank 0 on both."""
    return [Launch(["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(n),
                    "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "fastbyol", *argv])
            for n in (0, 1)]


@pytest.mark.slow
def test_two_node_launch_stops_and_resumes_exactly(data_dir, straight, tmp_path):
    from fastbyol.distributed import free_port

    out = tmp_path / "run"
    nodes = two_nodes(train_args(data_dir, out, "--resume", "auto"), free_port())
    assert nodes[0].wait_for(f"step 4/{STEPS}")
    for node in nodes:  # a scheduler signals every node
        os.kill(node.proc.pid, signal.SIGTERM)
    results = [node.finish() for node in nodes]
    assert "fastbyol: stopped by SIGTERM" in results[0][1], results[0][1][-3000:]
    step = load_checkpoint(str(out))["step"]
    assert 4 <= step < STEPS
    nodes = two_nodes(train_args(data_dir, out, "--resume", "auto"), free_port())
    for node in nodes:
        code, text = node.finish(300)
        assert code == 0, text[-3000:]
    final = load_checkpoint(str(out))
    assert final["step"] == STEPS and final["deepspeed"]["world_size"] == 2
    assert_same_weights(final, straight)
