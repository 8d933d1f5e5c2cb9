"""ImageNet scale on a simulated tree: index time and memory, worker memory per epoch, launch to
first batch, shard index times.

The benchmark is fastbyol.bench.scale (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.scale import main

if __name__ == "__main__":
    main()
