"""fastbyol: fast, paper-exact BYOL pretraining for PyTorch.

Importing the package is light: DALI, DeepSpeed and Triton load only where used.

Examples:
    >>> from fastbyol import BYOL
    >>> model = BYOL("resnet18", cifar_stem=True)
"""
from .config import AugmentConfig, Config, preset
from .errors import FastByolError
from .model import BYOL, MLPHead

__version__ = "0.1.0"
__all__ = ["BYOL", "MLPHead", "Config", "AugmentConfig", "preset", "FastByolError", "__version__"]
