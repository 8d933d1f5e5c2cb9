"""Input pipelines: images/s delivering BYOL's two augmented views, DALI vs torchvision.

The benchmark is fastbyol.bench.pipeline (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.pipeline import main

if __name__ == "__main__":
    main()
