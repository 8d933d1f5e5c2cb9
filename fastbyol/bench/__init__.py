"""Throughput benchmarks and the GPU check, installed with fastbyol.

``fastbyol bench`` runs :mod:`fastbyol.bench.train` (whole training steps against lightly and
byol-pytorch), ``fastbyol gpu-check`` runs :mod:`fastbyol.bench.gpucheck`; the kernel and data
micro-benchmarks are modules here too (``python -m fastbyol.bench.ema``, ``.loss``, ``.lars``,
``.pipeline``, ``.feeder``, ``.compat``, ``.vs_lightly``). ``benchmarks/`` in the source tree holds
the same as stand-alone scripts and the committed results.
"""
from .._checkout import ensure_kernels

# A plain checkout (nothing installed) and every worker process it spawns: kernels/ as fastbyol_kernels.
ensure_kernels()
