"""LARS step: fastbyol's multi-tensor, sync-free LARS vs a per-parameter loop vs the byte floor.

The benchmark is fastbyol.bench.lars (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.lars import main

if __name__ == "__main__":
    main()
