"""Whole BYOL training steps per second: fastbyol against lightly and byol-pytorch, one run.

The harness is the package ``benchmarks/trainbench/`` (its docstring lists the modes and
figures); this script is its entry point, and ``fastbyol bench`` runs it.

    python benchmarks/bench_train.py                       # GPU: both configs, batch 256
    python benchmarks/bench_train.py --smoke               # CPU seconds (CI)
    fastbyol bench -- --smoke                              # the same, through the CLI
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The names bench_vs_lightly and the tests use:
from trainbench.cli import build_parser, main  # noqa: E402,F401
from trainbench.configs import MODES, PEERS, BenchConfig, Context, Skip, _augment, bench_configs  # noqa: E402,F401
from trainbench.data import PILDataset, build_source  # noqa: E402,F401
from trainbench.fastbyol_runner import FastByolRunner  # noqa: E402,F401
from trainbench.peers import LightlyRunner  # noqa: E402,F401
from trainbench.report import machine_load, versions  # noqa: E402,F401
from trainbench.timing import measure, summarise  # noqa: E402,F401

if __name__ == "__main__":
    main()
