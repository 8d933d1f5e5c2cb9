"""Whole BYOL training steps per second against lightly and byol-pytorch (fastbyol bench).

The harness is fastbyol.bench.train (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.train import main

if __name__ == "__main__":
    main()
