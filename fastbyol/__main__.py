"""``python -m fastbyol`` (also what ``deepspeed -m fastbyol`` runs), installed or from a checkout."""
import sys

from ._checkout import ensure_kernels

ensure_kernels()  # a plain checkout: kernels/ as fastbyol_kernels

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
