"""fastbyol: the fastest correct BYOL pretraining system for PyTorch.

`kernels/` installs as the import package `fastbyol_kernels` (the bare name
`kernels` belongs to an unrelated PyPI project).
"""
from setuptools import find_packages, setup

# Pinned: everything built against torch must match the torch build exactly,
# or pip silently upgrades torch (see DEVELOPERS.md).
# Supported range (README, "GPU readiness"): torch >= 2.11, <= 2.13 and triton >= 3.6, <= 3.7
# (triton comes with torch's CUDA build). CI installs and tests the pin below; triton 3.6
# was checked once beside it (the AOT compile check and the kernel tests).
TORCH = ["torch==2.13.0,!=2.13.0+cpu", "torchvision==0.28.0"]

EXTRAS = {
    "test": ["pytest>=7", "matplotlib"],
    "dali": ["nvidia-dali-cuda130==2.4.0"],
    "dali-cuda120": ["nvidia-dali-cuda120"],
    "deepspeed": ["deepspeed==0.19.8"],
    # Peers for the benchmarks: install with --no-deps (README); lightly's transforms need
    # lightning-utilities, byol-pytorch's learner einops.
    "bench": ["lightly==1.6.0", "lightning-utilities==0.15.3", "byol-pytorch==0.9.1", "einops==0.8.2"],
    # fastbyol.compat.byol_pytorch's tests: the peer itself and what its README imports. Install
    # with --no-deps (.ci/run does): byol-pytorch would pull accelerate, kornia an unpinned torch.
    "compat-test": ["byol-pytorch==0.9.1", "einops==0.8.2", "kornia==0.9.0", "kornia-rs==0.2.0"],
    # The EMA drop-in tests compare against these; torch-dependent, so installed with
    # --no-deps (.ci/run does): at import they need only tqdm besides torch/torchvision/numpy.
    "peers": ["timm==1.0.31", "lightly==1.6.0", "tqdm"],
}
EXTRAS["all"] = sorted({d for k in ("test", "dali", "deepspeed") for d in EXTRAS[k]})

setup(
    name="fastbyol",
    version="0.1.0",
    description="Fast, paper-exact BYOL self-supervised pretraining (DALI, Triton, DeepSpeed)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastbyol", "fastbyol.*"]) + ["fastbyol_kernels"],
    package_dir={"fastbyol_kernels": "kernels"},
    install_requires=TORCH + ["numpy", "pillow"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastbyol = fastbyol.cli:main"]},
)
