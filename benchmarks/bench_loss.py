"""BYOL loss forward+backward: fused Triton kernels vs eager PyTorch vs the byte floor.

The benchmark is fastbyol.bench.loss (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.loss import main

if __name__ == "__main__":
    main()
