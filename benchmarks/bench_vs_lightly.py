"""fastbyol's full training step against lightly's BYOL example, side by side, on CPU.

The benchmark is fastbyol.bench.vs_lightly (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.vs_lightly import main

if __name__ == "__main__":
    main()
