"""The DALI feeder alone: images/s one rank's host side hands DALI (draws + reads + checks + columns).

The benchmark is fastbyol.bench.feeder (installed with fastbyol): this script runs it.
"""
from fastbyol.bench.feeder import main

if __name__ == "__main__":
    main()
