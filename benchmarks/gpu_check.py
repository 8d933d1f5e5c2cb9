"""``fastbyol gpu-check`` as a script (the harness is the package ``benchmarks/gpucheck/``).

    python benchmarks/gpu_check.py [--tiny] [--parts a,b,...] [--out DIR]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpucheck import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
