"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs,
so that the Triton kernels execute on CPU tensors (CI has no GPU); the interpreter then rounds
casts as compiled code does (fastbyol_kernels._interpreter)."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

# Compiled-code rounding for fp32 -> bf16 casts (and triton 3.6's indexing under numpy >= 2.4):
# the interpreter truncates, so bf16 outputs could not be checked bit for bit against torch.
from fastbyol_kernels._interpreter import use_compiled_semantics  # noqa: E402

COMPILED_SEMANTICS = use_compiled_semantics()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
