"""The compiled-kernel check (``fastbyol_kernels.check``) as a script, where the tests are:

    python tests/kernel_check.py --device cuda            # on a GPU: compiled kernels
    TRITON_INTERPRET=1 python tests/kernel_check.py --device cpu --quick   # what CI runs

It lives in the kernels package so that it runs without pytest (a bare GPU machine) and from
an installed fastbyol; see there for the cases and tolerances.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastbyol._checkout import ensure_kernels  # noqa: E402

ensure_kernels()
from fastbyol_kernels import check  # noqa: E402
from fastbyol_kernels.check import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
