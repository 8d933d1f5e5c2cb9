"""Running from a plain source checkout, nothing installed (``python -m fastbyol gpu-check``).

``kernels/`` is installed as the import package ``fastbyol_kernels``; in a checkout that was
never installed that name does not resolve. :func:`ensure_kernels` registers
``<checkout>/kernels`` under it, and does nothing when the name already imports.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def checkout_root() -> str:
    """The folder holding ``fastbyol/`` (and, in a checkout, ``kernels/`` and ``benchmarks/``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_kernels() -> str:
    """Make ``import fastbyol_kernels`` work; returns where it comes from."""
    if "fastbyol_kernels" not in sys.modules and importlib.util.find_spec("fastbyol_kernels") is None:
        init = os.path.join(checkout_root(), "kernels", "__init__.py")
        if os.path.isfile(init):
            spec = importlib.util.spec_from_file_location(
                "fastbyol_kernels", init, submodule_search_locations=[os.path.dirname(init)])
            module = importlib.util.module_from_spec(spec)
            sys.modules["fastbyol_kernels"] = module
            spec.loader.exec_module(module)
    spec = importlib.util.find_spec("fastbyol_kernels")
    return spec.origin if spec is not None else "not importable"
