"""Target-network EMA: fused multi-tensor kernel vs the ways peers do it, vs the byte floor.

The benchmark is fastbyol.bench.ema (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.ema import main

if __name__ == "__main__":
    main()
