"""Everything measured on the first GPU (fastbyol gpu-check).

The harness is fastbyol.bench.gpucheck (installed with fastbyol): this script runs it.
"""
import sys

from fastbyol.bench.gpucheck import main

if __name__ == "__main__":
    sys.exit(main())
