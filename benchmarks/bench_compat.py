"""fastbyol.compat.byol_pytorch vs byol-pytorch 0.9.1 itself: the README's training step, side by side.

The benchmark is fastbyol.bench.compat (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.compat import main

if __name__ == "__main__":
    main()
