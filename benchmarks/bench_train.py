"""Whole BYOL training steps per second: fastbyol against lightly and byol-pytorch, one run.

Configurations (``--configs``): ``cifar-resnet18`` (ResNet-18 with the CIFAR stem, 32 px,
in-memory uint8 images) and ``imagenet-resnet50`` (ResNet-50, 224 px, a JPEG folder). Both use
BYOL's heads (projector 4096 → 256, predictor 4096 → 256), bf16 autocast on CUDA, per-device
batch 256 (``--batch 128,256,512`` sweeps).

Modes, each measured in the same run, on the same device, on the same images:

  fastbyol              the trainer's step: DALI loader (torch loader where DALI or CUDA is
                        missing) → BYOL forward (fused loss) → LARS (multi-tensor) → fused EMA
  fastbyol-synthetic    the same step on views already on the device: the compute ceiling
                        (no decoding, no augmentation)
  lightly               lightly's BYOL example loop (lightly.transforms.BYOLTransform in a torch
                        DataLoader, BYOLProjectionHead/BYOLPredictionHead, update_momentum,
                        NegativeCosineSimilarity, SGD), heads resized to BYOL's
  byol-pytorch          byol-pytorch's ``BYOL`` learner and its README loop (Adam, its batched
                        default augmentation on the device; a DataLoader decodes and resizes)
                        (``use_simplicial_embeddings=False``: BYOL's network; 0.9.1 defaults to True)
  ablate-torch-loader   fastbyol with DALI → the torch DataLoader path
  ablate-eager-loss     fastbyol with the fused loss → its eager reference (``backend="torch"``)
  ablate-loop-ema       fastbyol with the fused EMA → a per-parameter loop (baselines.py)
  ablate-loop-lars      fastbyol with multi-tensor LARS → per-parameter LARS (baselines.py)

The peers get fastbyol's encoder, head widths and autocast; otherwise their loops are theirs.

Figures: images/s (median step time over the timed steps after warm-up; the mean over the
segment is kept too), peak GPU memory, the data pipeline's share (1 − e2e / ceiling), and
ratios to lightly and byol-pytorch. Every mode starts a fresh model and loader per segment,
so no prefetched batch or cached allocation carries over from another mode. A mode whose
package is missing is reported as ``skipped: <reason>``.

Scaling: with one device, an *estimate* for N devices from the measured step time and the
bytes all-reduced per step (the online network's fp32 gradients) at ``--interconnect-gbs``;
``--scaling`` also *measures* 1 → 2 processes on CPU (gloo, one flat gradient all-reduce per
step, synthetic inputs).

    python benchmarks/bench_train.py                       # GPU: both configs, batch 256
    python benchmarks/bench_train.py --smoke               # CPU seconds (CI)
    python benchmarks/bench_train.py --configs cifar-resnet18 --batch 32 --steps 5 --scaling
    python benchmarks/bench_train.py --configs imagenet-resnet50 --batch 8 --loader dali   # DALI's CPU backend
    fastbyol bench -- --smoke                              # the same, through the CLI

Writes ``bench_train_<device>_<configs>.{json,md,png}`` to ``--out`` (``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _common import RESULTS, markdown_table, stamp, sync, write_json  # noqa: E402
from baselines import PerParameterEMA, PerParameterLARS  # noqa: E402

from fastbyol.config import AugmentConfig, Config, preset  # noqa: E402
from fastbyol.data.image_source import ImageSource  # noqa: E402
from fastbyol.data.sources import load_source, scan_image_folder  # noqa: E402

TAU = 0.996  # a constant momentum: the schedule does not change the cost of a step
WEIGHT_DECAY = 1.5e-6

# --------------------------------------------------------------------------- configurations


@dataclass
class BenchConfig:
    name: str
    backbone: str  # resnet18 | resnet50 | convnet4
    cifar_stem: bool
    image_size: int
    projector_hidden: int
    projection_dim: int
    predictor_hidden: int
    source: str  # "array": in-memory uint8 (CIFAR-like) | "jpeg": a JPEG folder on disk
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    peer_blur: Optional[float] = None  # lightly's gaussian_blur prob for both views (None: its defaults)
    jpeg_size: tuple = (500, 375)


def _augment(preset_name: str, size: int) -> AugmentConfig:
    aug = preset(preset_name).augment
    aug.image_size = size
    return aug


def bench_configs() -> Dict[str, BenchConfig]:
    return {
        "cifar-resnet18": BenchConfig("cifar-resnet18", "resnet18", True, 32, 4096, 256, 4096, "array",
                                      _augment("cifar10-resnet18", 32), peer_blur=0.0),
        "imagenet-resnet50": BenchConfig("imagenet-resnet50", "resnet50", False, 224, 4096, 256, 4096, "jpeg",
                                         _augment("imagenet-resnet50", 224)),
        # CI: seconds on a 2-core CPU, through the JPEG-folder path.
        "smoke": BenchConfig("smoke", "convnet4", False, 16, 64, 32, 64, "jpeg", _augment("smoke", 16),
                             peer_blur=0.0, jpeg_size=(40, 30)),
    }


MODES = ["fastbyol", "fastbyol-synthetic", "lightly", "byol-pytorch",
         "ablate-torch-loader", "ablate-eager-loss", "ablate-loop-ema", "ablate-loop-lars"]
PEERS = ("lightly", "byol-pytorch")


class Skip(Exception):
    """A mode that cannot run here; the message is the reason in the table."""


@dataclass
class Context:
    cfg: BenchConfig
    device: torch.device
    batch: int
    precision: str
    workers: int
    kernels: str  # backend for the fused loss / EMA in the full mode
    source: ImageSource
    seed: int = 0
    allreduce: bool = False  # all-reduce gradients over the default process group (--scaling)
    no_dali_reason: Optional[str] = None  # why the full mode uses the torch loader

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision])


# --------------------------------------------------------------------------- data

def cache_root(cache: Optional[str]) -> str:
    return cache or os.path.join(os.environ.get("FASTBYOL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastbyol"), "bench")


def photo_like(seed: int, width: int, height: int) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` image with structure at several scales (so JPEG sizes and
    decode times are ImageNet-like, ~80-100 KB at 500×375, q90), not flat colour or white noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((4, 110.0), (16, 50.0), (64, 30.0), (200, 24.0)):
        cw = max(2, min(cells, width // 2))
        ch = max(2, cw * height // width)
        small = rng.integers(0, 256, (ch, cw, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
        img += amp * (up / 127.5 - 1.0)
    img += rng.normal(0, 10, img.shape) + rng.uniform(98, 158, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_jpeg(args) -> None:
    from PIL import Image

    path, seed, width, height, quality = args
    tmp = path + ".tmp"
    Image.fromarray(photo_like(seed, width, height)).save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)


def ensure_jpeg_folder(n: int, size=(500, 375), quality: int = 90, cache: Optional[str] = None,
                       classes: int = 10) -> str:
    """An ImageNet-like folder of at least ``n`` JPEGs (``root/classK/NNNNNN.jpg``), written
    once (in parallel) and grown when a later run needs more."""
    root = os.path.join(cache_root(cache), f"jpeg-{size[0]}x{size[1]}-q{quality}-v1")
    marker = os.path.join(root, "done.json")
    have = 0
    if os.path.isfile(marker):
        with open(marker) as fh:
            have = json.load(fh).get("images", 0)
    if have >= n:
        return root
    jobs = []
    for i in range(have, n):
        d = os.path.join(root, f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        jobs.append((os.path.join(d, f"{i:07d}.jpg"), i, size[0], size[1], quality))
    t0 = time.perf_counter()
    procs = min(len(jobs), os.cpu_count() or 1)
    if procs > 1 and len(jobs) > 64:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(procs) as pool:
            pool.map(_write_jpeg, jobs, chunksize=32)
    else:
        for j in jobs:
            _write_jpeg(j)
    with open(marker + ".tmp", "w") as fh:
        json.dump({"images": n, "size": list(size), "quality": quality}, fh)
    os.replace(marker + ".tmp", marker)
    print(f"wrote {len(jobs)} JPEGs ({size[0]}x{size[1]}, q{quality}) to {root} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return root


def cifar_like_array(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` CIFAR-like uint8 images ``[n, size, size, 3]`` in memory (smooth multi-scale
    colour structure plus noise), generated in one vectorised pass."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 3, size, size)
    for cells, amp in ((2, 0.45), (4, 0.25), (8, 0.15)):
        low = torch.rand(n, 3, cells, cells, generator=g) * 2 - 1
        img += amp * torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img += 0.04 * torch.randn(n, 3, size, size, generator=g) + 0.5
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def build_source(cfg: BenchConfig, n: int, data: Optional[str], cache: Optional[str]) -> ImageSource:
    if data is not None:
        return load_source(data)
    if cfg.source == "array":
        arr = cifar_like_array(n, cfg.image_size)
        return ImageSource(labels=np.zeros(n, np.int64), classes=["0"], array=arr, root="<generated CIFAR-like array>")
    return scan_image_folder(ensure_jpeg_folder(n, cfg.jpeg_size, cache=cache))


def forever(make_epoch: Callable[[int], Iterator]) -> Iterator:
    """Batches across epochs; an epoch that yields nothing is an error, not a hang."""
    epoch = 0
    while True:
        got = False
        for b in make_epoch(epoch):
            got = True
            yield b
        if not got:
            raise RuntimeError("an epoch produced no batch: the data set is smaller than the batch")
        epoch += 1


class PILDataset(torch.utils.data.Dataset):
    """(transform(RGB PIL image), 0) per sample: the shape of torchvision's CIFAR10 / ImageFolder,
    which the peers' loops expect. Decodes exactly as fastbyol's torch loader does."""

    def __init__(self, source: ImageSource, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from fastbyol.data.torch_loader import open_rgb

        return self.transform(open_rgb(self.source, i)), 0


def peer_loader(ctx: Context, transform) -> torch.utils.data.DataLoader:
    # As lightly's example: shuffle, drop_last, no pinning; workers as every mode here.
    return torch.utils.data.DataLoader(PILDataset(ctx.source, transform), batch_size=ctx.batch, shuffle=True,
                                       drop_last=True, num_workers=ctx.workers)


def synthetic_views(ctx: Context, channels_last: bool = True):
    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    s = ctx.cfg.image_size
    views = []
    for _ in range(2):
        v = torch.randn(ctx.batch, 3, s, s, generator=g).to(ctx.device)
        views.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
    return views


def allreduce_grads(params: List[torch.Tensor]) -> None:
    """DDP-style data parallelism, simplest form: one flat bucket of all gradients,
    all-reduced (sum) after backward and averaged."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


# --------------------------------------------------------------------------- runners

class Runner:
    """One mode: ``batches()`` yields inputs forever, ``step(batch)`` is one optimizer step."""

    details: Dict
    online_params: List[torch.Tensor]

    def batches(self) -> Iterator:
        raise NotImplementedError

    def step(self, batch) -> None:
        raise NotImplementedError


def kernels_import():
    try:
        import fastbyol_kernels  # noqa: F401
    except ImportError as e:
        raise Skip(f"fastbyol_kernels not importable ({e})") from None


def dali_import_error() -> Optional[str]:
    """None when fastbyol's DALI loader and DALI itself import, else why not."""
    try:
        from fastbyol.data.dali import DaliTwoViewLoader  # noqa: F401
        import nvidia.dali  # noqa: F401
    except Exception as e:  # not installed, or fastbyol.data.dali not there yet
        return f"DALI loader not importable ({type(e).__name__}: {e})"
    return None


def resolve_full_loader(requested: str, device: torch.device):
    """(loader of the full mode, why it is not DALI or None). ``auto`` is the trainer's choice
    (:func:`fastbyol.data.choose_loader`): DALI on CUDA when it imports, else torch;
    ``dali`` on CPU runs DALI's CPU backend."""
    if requested == "torch":
        return "torch", "--loader torch"
    err = dali_import_error()
    if requested == "dali":
        if err:
            raise SystemExit(f"bench_train: --loader dali: {err}")
        return "dali", None
    if err:
        return "torch", err
    if device.type != "cuda":
        return "torch", "the trainer picks the torch loader on CPU; --loader dali runs DALI's CPU backend"
    return "dali", None


class FastByolRunner(Runner):
    """fastbyol's training step, as :class:`fastbyol.trainer.Trainer` runs it, with each fused
    piece switchable: ``loader`` dali|torch|synthetic, ``loss`` fused|eager, ``ema``
    fused|loop, ``lars`` foreach|loop."""

    def __init__(self, ctx: Context, loader: str = "dali", loss: str = "fused", ema: str = "fused",
                 lars: str = "foreach"):
        kernels_import()
        from fastbyol.engine import LocalEngine
        from fastbyol.optim import build_optimizer, param_groups
        from fastbyol.schedules import scaled_lr
        from fastbyol.backbones import memory_format
        from fastbyol.trainer import build_model

        self.ctx, c = ctx, ctx.cfg
        cfg = Config()
        cfg.model.backbone, cfg.model.cifar_stem = c.backbone, c.cifar_stem
        cfg.model.projector_hidden, cfg.model.projection_dim = c.projector_hidden, c.projection_dim
        cfg.model.predictor_hidden = c.predictor_hidden
        cfg.augment.image_size = c.image_size
        cfg.optim.weight_decay = WEIGHT_DECAY
        loss_backend = ctx.kernels if loss == "fused" else "torch"
        cfg.train.kernels = loss_backend
        torch.manual_seed(ctx.seed)
        self.model = build_model(cfg, ctx.device)  # the trainer's layout, loss_fn = byol_loss(backend=...)
        channels_last = memory_format(cfg, ctx.device) == torch.channels_last
        self.model.train()
        lr = scaled_lr(cfg.optim.base_lr, ctx.batch)
        if lars == "foreach":
            opt = build_optimizer(self.model.online, cfg.optim, lr)
        elif lars == "sgd":  # attribution only (bench_vs_lightly): lightly's example optimizer
            opt = torch.optim.SGD(self.model.online.parameters(), lr=0.06)
        else:
            opt = PerParameterLARS(param_groups(self.model.online, WEIGHT_DECAY), lr=lr,
                                   momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient)
        self.engine = LocalEngine(self.model.online, opt, ctx.device, ctx.precision)
        self.online_params = [p for p in self.model.online.parameters() if p.requires_grad]
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=ctx.device)
        if ema == "fused":
            self.ema_backend = ctx.kernels
            self.update_target = lambda: self.model.update_target(TAU, "none", self.ema_backend)
        else:
            loop = PerParameterEMA(nn.ModuleList([self.model.online.encoder, self.model.online.projector]),
                                   self.model.target)
            self.update_target = lambda: loop.update(TAU)
        self.loader_kind = loader
        if loader == "synthetic":
            self.views = synthetic_views(ctx, channels_last)
        else:
            kwargs = dict(seed=ctx.seed, rank=0, world_size=1, workers=ctx.workers, channels_last=channels_last)
            if loader == "dali":
                from fastbyol.data.dali import DaliTwoViewLoader

                self.loader = DaliTwoViewLoader(ctx.source, c.augment, ctx.batch, ctx.device, **kwargs)
            else:
                from fastbyol.data.torch_loader import TorchTwoViewLoader

                self.loader = TorchTwoViewLoader(ctx.source, c.augment, ctx.batch, ctx.device, **kwargs)
        self.details = {
            "loader": {"dali": "DALI" + (" (CPU backend)" if ctx.device.type == "cpu" else ""),
                       "torch": "torch DataLoader (host crops) + batched device photometry",
                       "synthetic": "pre-made views on the device"}[loader],
            "loss": f"byol_loss(backend={loss_backend!r})",
            "ema": f"ModuleEMA(backend={ctx.kernels!r})" if ema == "fused" else "per-parameter loop (baseline)",
            "optimizer": {"foreach": "LARS (multi-tensor foreach)", "loop": "LARS per-parameter loop (baseline)",
                          "sgd": "SGD lr 0.06, no momentum (lightly example's; attribution only)"}[lars],
            "precision": ctx.precision, "channels_last": channels_last,
        }

    def batches(self):
        if self.loader_kind == "synthetic":
            while True:
                yield self.views

        def epoch(e):
            self.loader.set_epoch(e)
            for b in self.loader:
                yield b.view1, b.view2

        yield from forever(epoch)

    def step(self, batch) -> None:
        v1, v2 = batch
        with self.engine.autocast():
            out = self.model(v1, v2, online=self.engine.module)
        self.engine.backward(out.loss)
        self.nonfinite |= ~torch.isfinite(out.loss.detach().float())  # the trainer's sync-free loss check
        if self.ctx.allreduce:
            allreduce_grads(self.online_params)
        self.engine.step()
        self.update_target()


def peer_backbone(cfg: BenchConfig):
    """The same encoder architecture fastbyol builds, as a plain torchvision module (or
    ConvNet4), for the peers. ``(module, feature_dim)``."""
    import torchvision

    if cfg.backbone == "convnet4":
        from fastbyol.backbones import ConvNet4

        net = ConvNet4()
        return net, net.out_dim
    net = getattr(torchvision.models, cfg.backbone)()
    if cfg.cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, net.fc.in_features


class LightlyRunner(Runner):
    """lightly's BYOL example (lightly/examples/pytorch/byol.py), faithfully, with the lightly
    package itself: its model class, heads, transforms, loss, momentum update and SGD. Head
    widths are the benchmark's (the example's are 512 → 1024 → 256); the forward runs under the
    same autocast as fastbyol's (a no-op in fp32)."""

    def __init__(self, ctx: Context, synthetic: bool = False):
        try:
            from lightly.loss import NegativeCosineSimilarity
            from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
            from lightly.models.utils import deactivate_requires_grad, update_momentum
            from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
            from lightly.utils.scheduler import cosine_schedule
        except Exception as e:
            raise Skip(f"lightly not importable ({type(e).__name__}: {e}); pip install --no-deps lightly==1.6.0 "
                       "lightning-utilities==0.15.3") from None
        import lightly

        self.ctx, c = ctx, ctx.cfg
        self.update_momentum = update_momentum

        class BYOL(nn.Module):  # the example's model class
            def __init__(self, backbone):
                super().__init__()
                self.backbone = backbone
                self.projection_head = BYOLProjectionHead(feat_dim, c.projector_hidden, c.projection_dim)
                self.prediction_head = BYOLPredictionHead(c.projection_dim, c.predictor_hidden, c.projection_dim)
                self.backbone_momentum = copy.deepcopy(self.backbone)
                self.projection_head_momentum = copy.deepcopy(self.projection_head)
                deactivate_requires_grad(self.backbone_momentum)
                deactivate_requires_grad(self.projection_head_momentum)

            def forward(self, x):
                y = self.backbone(x).flatten(start_dim=1)
                z = self.projection_head(y)
                p = self.prediction_head(z)
                return p

            def forward_momentum(self, x):
                y = self.backbone_momentum(x).flatten(start_dim=1)
                z = self.projection_head_momentum(y)
                z = z.detach()
                return z

        torch.manual_seed(ctx.seed)
        resnet, feat_dim = peer_backbone(c)
        backbone = resnet if c.backbone == "convnet4" else nn.Sequential(*list(resnet.children())[:-1])
        self.model = BYOL(backbone).to(ctx.device)
        self.criterion = NegativeCosineSimilarity()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.06)
        self.momentum_val = cosine_schedule(0, 10, 0.996, 1)
        self.online_params = [p for p in self.model.parameters() if p.requires_grad]
        self.total_loss = torch.zeros((), device=ctx.device)
        self.synthetic = synthetic
        if synthetic:
            self.views = synthetic_views(ctx, channels_last=False)
        else:
            blur = {} if c.peer_blur is None else {"gaussian_blur": c.peer_blur}
            transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=c.image_size, **blur),
                                      view_2_transform=BYOLView2Transform(input_size=c.image_size, **blur))
            self.loader = peer_loader(ctx, transform)
        self.details = {
            "loader": "pre-made views on the device" if synthetic else
            f"lightly BYOLTransform (PIL, per image) in a torch DataLoader, {ctx.workers} workers",
            "loss": "lightly NegativeCosineSimilarity", "ema": "lightly update_momentum (per-parameter)",
            "optimizer": "SGD lr 0.06 (example)", "precision": ctx.precision, "lightly": lightly.__version__,
        }

    def batches(self):
        if self.synthetic:
            while True:
                yield (self.views, 0)
        yield from forever(lambda e: iter(self.loader))

    def step(self, batch) -> None:  # the example's loop body
        model, device = self.model, self.ctx.device
        x0, x1 = batch[0]
        self.update_momentum(model.backbone, model.backbone_momentum, m=self.momentum_val)
        self.update_momentum(model.projection_head, model.projection_head_momentum, m=self.momentum_val)
        x0 = x0.to(device)
        x1 = x1.to(device)
        with self.ctx.autocast():
            p0 = model(x0)
            z0 = model.forward_momentum(x0)
            p1 = model(x1)
            z1 = model.forward_momentum(x1)
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        self.total_loss += loss.detach()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def import_byol_pytorch():
    """byol-pytorch's ``BYOL`` learner class, and how it was loaded.

    The package's ``__init__`` also imports its ``accelerate``-based trainer; where accelerate
    is not installed, the learner module (``byol_pytorch/byol_pytorch.py``, which needs only
    torch, torchvision and einops) is loaded on its own, unchanged."""
    try:
        from byol_pytorch import BYOL

        return BYOL, "import byol_pytorch"
    except ImportError as e:
        spec = importlib.util.find_spec("byol_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise Skip("byol-pytorch not installed; pip install --no-deps byol-pytorch==0.9.1 einops") from None
        path = os.path.join(list(spec.submodule_search_locations)[0], "byol_pytorch.py")
        try:
            mspec = importlib.util.spec_from_file_location("_byol_pytorch_learner", path)
            mod = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(mod)
        except Exception as e2:
            raise Skip(f"byol-pytorch not importable ({type(e2).__name__}: {e2})") from None
        return mod.BYOL, f"learner module loaded alone (package __init__ failed: {e})"


class ByolPytorchRunner(Runner):
    """byol-pytorch's README loop: ``loss = learner(images); opt.zero_grad(); loss.backward();
    opt.step(); learner.update_moving_average()``, Adam 3e-4. The learner augments the batch on
    the device with its default (torchvision) pipeline; a DataLoader decodes and resizes the
    images to the input size. Same encoder, 4096-wide MLPs, 256-d projections;
    ``use_simplicial_embeddings=False`` so the network is BYOL's (0.9.1 defaults to True)."""

    def __init__(self, ctx: Context):
        learner_cls, how = import_byol_pytorch()
        import torchvision.transforms as T

        self.ctx, c = ctx, ctx.cfg
        if c.projector_hidden != c.predictor_hidden:
            raise Skip("byol-pytorch uses one hidden width for projector and predictor")
        torch.manual_seed(ctx.seed)
        net, _ = peer_backbone(c)
        net = net.to(ctx.device)
        self.learner = learner_cls(net, image_size=c.image_size, hidden_layer=-1 if c.backbone == "convnet4" else "avgpool",
                                   projection_size=c.projection_dim, projection_hidden_size=c.projector_hidden,
                                   use_simplicial_embeddings=False)
        self.opt = torch.optim.Adam(self.learner.parameters(), lr=3e-4)
        self.online_params = [p for p in self.learner.online_encoder.parameters()] + \
            [p for p in self.learner.online_predictor.parameters()]
        s = c.image_size
        self.loader = peer_loader(ctx, T.Compose([T.Resize((s, s)), T.PILToTensor()]))
        self.details = {"loader": f"torch DataLoader: decode + resize to {s}x{s} (uint8), {ctx.workers} workers; "
                                  "learner's default augmentation batched on the device",
                        "loss": "byol-pytorch cosine loss", "ema": "byol-pytorch update_moving_average (per-parameter)",
                        "optimizer": "Adam lr 3e-4 (README)", "precision": ctx.precision, "loaded": how}

    def batches(self):
        yield from forever(lambda e: iter(self.loader))

    def step(self, batch) -> None:
        images = batch[0].to(self.ctx.device).float().div_(255)
        with self.ctx.autocast():
            loss = self.learner(images)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.learner.update_moving_average()


def build_runner(mode: str, ctx: Context, full_loader: str) -> Runner:
    if mode == "fastbyol":
        return FastByolRunner(ctx, loader=full_loader)
    if mode == "fastbyol-synthetic":
        return FastByolRunner(ctx, loader="synthetic")
    if mode == "fastbyol-synthetic-sgd":
        return FastByolRunner(ctx, loader="synthetic", lars="sgd")
    if mode == "lightly":
        return LightlyRunner(ctx)
    if mode == "lightly-synthetic":
        return LightlyRunner(ctx, synthetic=True)
    if mode == "byol-pytorch":
        return ByolPytorchRunner(ctx)
    if mode == "ablate-torch-loader":
        if full_loader == "torch":
            raise Skip(f"the full mode already uses the torch loader ({ctx.no_dali_reason})")
        return FastByolRunner(ctx, loader="torch")
    if mode == "ablate-eager-loss":
        return FastByolRunner(ctx, loader=full_loader, loss="eager")
    if mode == "ablate-loop-ema":
        return FastByolRunner(ctx, loader=full_loader, ema="loop")
    if mode == "ablate-loop-lars":
        return FastByolRunner(ctx, loader=full_loader, lars="loop")
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------- timing

def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_segment(mode: str, ctx: Context, full_loader: str, warmup: int, steps: int) -> Dict:
    """Build a fresh runner, run ``warmup`` untimed and ``steps`` timed steps (each timed from
    asking for the batch to the finished target update, synchronised), tear it down."""
    free_device_memory(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    runner = build_runner(mode, ctx, full_loader)
    it = runner.batches()
    times: List[float] = []
    try:
        t_start = None
        for i in range(warmup + steps):
            if i == warmup:
                sync(ctx.device)
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            batch = next(it)
            runner.step(batch)
            sync(ctx.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
    finally:
        it.close()
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30 if ctx.device.type == "cuda" else None
    grad_bytes = sum(p.numel() * 4 for p in runner.online_params)  # fp32 gradients
    details = runner.details
    del runner, it
    free_device_memory(ctx.device)
    return {"times": times, "wall": wall, "peak_mem_gib": peak, "details": details, "grad_bytes": grad_bytes}


def summarise(times: List[float], walls: List[float], batch: int) -> Dict:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    return {"img_s": batch / med, "img_s_mean": batch * len(times) / sum(walls), "step_ms": med * 1e3,
            "step_ms_p25": q[0] * 1e3, "step_ms_p75": q[2] * 1e3, "timed_steps": len(times)}


def measure(modes: List[str], ctx: Context, full_loader: str, warmup: int, steps: int, rounds: int,
            log=print) -> Dict[str, Dict]:
    """Every mode for ``rounds`` segments, alternating modes within each round (drifts of
    clock, temperature or background load spread over all modes instead of one)."""
    acc: Dict[str, Dict] = {m: {"times": [], "walls": [], "peak": None, "round_medians": []} for m in modes}
    for r in range(rounds):
        for m in modes:
            a = acc[m]
            if "skipped" in a:
                continue
            try:
                seg = run_segment(m, ctx, full_loader, warmup, steps)
            except Skip as e:
                a["skipped"] = f"skipped: {e}"
                log(f"  {m:<22} {a['skipped']}")
                continue
            except Exception as e:  # a broken mode is a row of the table, not the end of the run
                traceback.print_exc()
                a["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                log(f"  {m:<22} {a['skipped']}")
                continue
            a["times"] += seg["times"]
            a["round_medians"].append(statistics.median(seg["times"]))
            a["walls"].append(seg["wall"])
            a["details"], a["grad_bytes"] = seg["details"], seg["grad_bytes"]
            if seg["peak_mem_gib"] is not None:
                a["peak"] = max(a["peak"] or 0.0, seg["peak_mem_gib"])
            log(f"  {m:<22} round {r + 1}/{rounds}: median step {statistics.median(seg['times']) * 1e3:8.1f} ms "
                f"({ctx.batch / statistics.median(seg['times']):8.1f} img/s)")
    return acc


# --------------------------------------------------------------------------- scaling

def scaling_estimate(step_s: float, grad_bytes: int, gbs: float, worlds=(1, 2, 4, 8)) -> List[Dict]:
    """ESTIMATE for N data-parallel devices at a fixed per-device batch: a ring all-reduce moves
    2(N−1)/N × the gradient bytes through each device's link; ``no_overlap`` adds that time to
    the step (upper bound on the step), ``full_overlap`` hides it behind the backward pass."""
    out = []
    for n in worlds:
        t_ar = 2 * (n - 1) / n * grad_bytes / (gbs * 1e9)
        out.append({"devices": n, "allreduce_ms": t_ar * 1e3, "step_ms_no_overlap": (step_s + t_ar) * 1e3,
                    "efficiency_no_overlap": step_s / (step_s + t_ar),
                    "efficiency_full_overlap": step_s / max(step_s, t_ar)})
    return out


def _scaling_worker(rank: int, world: int, port: int, cfg_name: str, batch: int, warmup: int, steps: int,
                    threads: int, out_path: str) -> None:
    import torch.distributed as dist

    from fastbyol.distributed import close_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = bench_configs()[cfg_name]
        ctx = Context(cfg, torch.device("cpu"), batch, "fp32", 0, "torch",
                      ImageSource(labels=np.zeros(1, np.int64), classes=["0"]), seed=0, allreduce=True)
        runner = FastByolRunner(ctx, loader="synthetic")
        views = runner.views
        ar_times, times = [], []
        dist.barrier()
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            with runner.engine.autocast():
                out = runner.model(*views, online=runner.engine.module)
            runner.engine.backward(out.loss)
            t1 = time.perf_counter()
            allreduce_grads(runner.online_params)
            t2 = time.perf_counter()
            runner.engine.step()
            runner.update_target()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                ar_times.append(t2 - t1)
        res = torch.tensor([statistics.median(times), statistics.median(ar_times)], dtype=torch.float64)
        dist.all_reduce(res, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump({"step_s": res[0].item(), "allreduce_s": res[1].item(),
                           "grad_bytes": sum(p.numel() * 4 for p in runner.online_params)}, fh)
    finally:
        close_process_group()


def gloo_scaling(cfg_name: str, batch: int, warmup: int, steps: int, log=print) -> Dict:
    """MEASURED on CPU: step time of data-parallel BYOL at 1 and 2 processes (gloo), fixed
    per-process batch and one thread per process (so 2 processes use the cores 1 leaves idle)."""
    import torch.multiprocessing as mp

    from fastbyol.distributed import free_port

    threads = max(1, (os.cpu_count() or 2) // 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            path = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_scaling_worker, args=(world, free_port(), cfg_name, batch, warmup, steps, threads, path),
                     nprocs=world, join=True)
            with open(path) as fh:
                r = json.load(fh)
            r.update(processes=world, img_s=world * batch / r["step_s"])
            rows.append(r)
            log(f"  gloo {world} process(es): step {r['step_s'] * 1e3:.1f} ms, all-reduce {r['allreduce_s'] * 1e3:.1f} ms, "
                f"{r['img_s']:.1f} img/s")
    base = rows[0]
    for r in rows:
        r["speedup"] = r["img_s"] / base["img_s"]
        r["efficiency"] = r["speedup"] / r["processes"]
    return {"config": cfg_name, "per_process_batch": batch, "threads_per_process": threads, "backend": "gloo",
            "inputs": "synthetic views (compute + communication only)",
            "allreduce": "one flat fp32 bucket after backward (no overlap)", "rows": rows}


# --------------------------------------------------------------------------- reporting

def versions() -> Dict:
    out = {}
    for name, mod in (("torchvision", "torchvision"), ("numpy", "numpy"), ("pillow", "PIL"), ("lightly", "lightly"),
                      ("nvidia-dali", "nvidia.dali")):
        try:
            out[name] = getattr(__import__(mod, fromlist=["__version__"]), "__version__", "?")
        except Exception:
            out[name] = None
    try:
        from importlib.metadata import version

        out["byol-pytorch"] = version("byol-pytorch")
    except Exception:
        out["byol-pytorch"] = None
    out["cuda"] = torch.version.cuda
    return out


def machine_load() -> Dict:
    """Load average and CPU pressure (Linux PSI): a shared, noisy box shows here."""
    out = {}
    for key, path in (("loadavg", "/proc/loadavg"), ("cpu_pressure", "/proc/pressure/cpu")):
        try:
            with open(path) as fh:
                out[key] = fh.readline().strip()
        except OSError:
            pass
    return out


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


COLUMNS = ["config", "batch", "mode", "img/s", "step ms (p25-p75)", "peak GiB", "data share", "vs ceiling",
           "x lightly", "x byol-pytorch", "status"]


def table_rows(rows: List[Dict]) -> List[Dict]:
    out = []
    for r in rows:
        ok = r["status"] == "ok"
        f = lambda k, fmt="{:.2f}": (fmt.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        out.append({
            "config": r["config"], "batch": r["batch"], "mode": r["mode"],
            "img/s": f("img_s", "{:,.1f}"),
            "step ms (p25-p75)": f"{r['step_ms']:.1f} ({r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f})" if ok else "",
            "peak GiB": f("peak_mem_gib"), "data share": f("data_share", "{:.1%}"), "vs ceiling": f("vs_ceiling", "{:.1%}"),
            "x lightly": f("x_lightly", "{:.2f}x"), "x byol-pytorch": f("x_byol_pytorch", "{:.2f}x"),
            "status": r["status"],
        })
    return out


def plot(result: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups: Dict = {}
    for r in result["rows"]:
        groups.setdefault((r["config"], r["batch"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.45 * len(MODES) * len(groups) + 1.2), squeeze=False)
    for ax, ((cfg, batch), rows) in zip(axes[:, 0], groups.items()):
        names = [r["mode"] for r in rows][::-1]
        vals = [r.get("img_s") or 0.0 for r in rows][::-1]
        colours = ["tab:blue" if n.startswith("fastbyol") else "tab:gray" if n in PEERS else "tab:orange" for n in names]
        bars = ax.barh(names, vals, color=colours)
        for b, r in zip(bars, rows[::-1]):
            text = f" {r['img_s']:,.1f}" if r["status"] == "ok" else f" {r['status'][:60]}"
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, text, va="center", fontsize=7)
        ax.set_title(f"{cfg}, batch {batch}", fontsize=9)
        ax.set_xlabel("images/s (median step)")
        ax.set_xlim(0, max(vals + [1e-9]) * 1.35)
    s = result["stamp"]
    fig.suptitle(f"BYOL training step throughput — {s['device']}\ntorch {s['torch']}, {s['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(result: Dict) -> str:
    s = result["stamp"]
    lines = [f"# bench_train: BYOL training-step throughput ({s['device']})", "",
             f"- date {s['date']}, torch {s['torch']}, python {s['python']}, "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
             f"- command: `{result['command']}`",
             f"- precision {result['precision']}, workers {result['workers']}, warm-up {result['warmup']} + "
             f"{result['steps']} timed steps x {result['rounds']} round(s) per mode; img/s = batch / median step",
             "", markdown_table(table_rows(result["rows"]), COLUMNS), ""]
    for r in result["rows"]:
        if r["status"] == "ok":
            lines.append(f"- **{r['config']} / {r['mode']}**: " + "; ".join(f"{k}: {v}" for k, v in r["details"].items()))
    if result.get("scaling_estimate"):
        lines += ["", f"## Multi-device scaling — ESTIMATE (not measured), {result['interconnect_gbs']} GB/s all-reduce "
                      "bus bandwidth assumed", ""]
        for cfg, est in result["scaling_estimate"].items():
            lines.append(f"- {cfg}: {est['grad_mb']:.1f} MB of fp32 gradients per step, measured 1-device step "
                         f"{est['step_ms']:.1f} ms → " + ", ".join(
                             f"{e['devices']}×: +{e['allreduce_ms']:.1f} ms, eff. {e['efficiency_no_overlap']:.0%}"
                             f"–{e['efficiency_full_overlap']:.0%}" for e in est["rows"]))
    g = result.get("gloo_scaling")
    if g:
        lines += ["", f"## Data-parallel scaling on CPU — MEASURED (gloo, {g['config']}, batch {g['per_process_batch']}"
                      f"/process, {g['threads_per_process']} thread(s)/process, {g['inputs']})", "",
                  markdown_table([{"processes": r["processes"], "step ms": r["step_s"] * 1e3,
                                   "all-reduce ms": r["allreduce_s"] * 1e3, "img/s": r["img_s"],
                                   "speedup": r["speedup"], "efficiency": r["efficiency"]} for r in g["rows"]],
                                 ["processes", "step ms", "all-reduce ms", "img/s", "speedup", "efficiency"])]
    if result.get("targets"):
        lines += ["", "## Targets (H100, imagenet-resnet50, bf16)", ""]
        lines += [f"- {k}: {v}" for k, v in result["targets"].items()]
    lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def check_targets(rows: List[Dict], device: torch.device) -> Dict:
    if device.type != "cuda":
        return {"status": "n/a: the targets are for an H100; this run is on CPU"}
    full = [r for r in rows if r["config"] == "imagenet-resnet50" and r["mode"] == "fastbyol" and r["status"] == "ok"]
    if not full:
        return {"status": "n/a: imagenet-resnet50 fastbyol not measured"}
    r = max(full, key=lambda r: r["batch"] == 256)
    t = {"batch": r["batch"], "img_s >= 1900": f"{r['img_s']:.0f} → {'PASS' if r['img_s'] >= 1900 else 'FAIL'}"}
    if r.get("vs_ceiling") is not None:
        t[">= 95% of ceiling"] = f"{r['vs_ceiling']:.1%} → {'PASS' if r['vs_ceiling'] >= 0.95 else 'FAIL'}"
    for k, name in (("x_lightly", "lightly"), ("x_byol_pytorch", "byol-pytorch")):
        if r.get(k) is not None:
            t[f">= 3x {name}"] = f"{r[k]:.2f}x → {'PASS' if r[k] >= 3 else 'FAIL'}"
    return t


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Modes: " + ", ".join(MODES))
    p.add_argument("--smoke", action="store_true",
                   help="CPU seconds for CI: convnet4 at 16 px, batch 16, 1 warm-up + 3 timed steps, workers 0")
    p.add_argument("--configs", default=None, help="comma list of cifar-resnet18, imagenet-resnet50, smoke "
                                                   "(default: the first two; smoke with --smoke)")
    p.add_argument("--batch", default=None, help="per-device batch; a comma list sweeps (default 256; smoke 16)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of modes to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode and round (GPU 30, CPU 5, smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 10, CPU 2, smoke 1)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds over the modes (default 1)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers / DALI threads, the same for every mode (CUDA: cores up to 16; CPU: 2; smoke: 0)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default=None,
                   help="fused loss/EMA backend of the full mode (default: auto on CUDA, torch on CPU, where the "
                        "Triton kernels could only run in the interpreter)")
    p.add_argument("--loader", choices=["auto", "dali", "torch"], default="auto",
                   help="loader of the full mode: auto = the trainer's choice (DALI on CUDA when installed, "
                        "else torch); dali on CPU runs DALI's CPU backend")
    p.add_argument("--data", default=None, help="a real image folder or CIFAR batch dir instead of the generated data")
    p.add_argument("--images", type=int, default=None,
                   help="generated images (default: enough that no timed segment crosses an epoch)")
    p.add_argument("--cache", default=None, help="where the generated JPEG folder is cached (~/.cache/fastbyol/bench)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--interconnect-gbs", type=float, default=None,
                   help="all-reduce bus bandwidth (GB/s) assumed by the multi-device ESTIMATE "
                        "(default 400: NCCL on 8x H100 SXM NVLink; CPU: 10)")
    p.add_argument("--scaling", action="store_true",
                   help="also MEASURE data-parallel step time at 1 and 2 processes on CPU (gloo)")
    p.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[List[str]] = None) -> Dict:
    if argv and argv[0] == "--":  # `fastbyol bench -- ARGS` passes the separator through
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu and not args.smoke else torch.device("cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    configs = (args.configs or ("smoke" if args.smoke else "cifar-resnet18,imagenet-resnet50")).split(",")
    batches = [int(b) for b in (args.batch or ("16" if args.smoke else "256")).split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES + ["lightly-synthetic", "fastbyol-synthetic-sgd"]:
            raise SystemExit(f"bench_train: unknown mode {m!r}; choose from {', '.join(MODES)}")
    all_cfgs = bench_configs()
    for c in configs:
        if c not in all_cfgs:
            raise SystemExit(f"bench_train: unknown config {c!r}; choose from {', '.join(all_cfgs)}")
    steps = args.steps or (3 if args.smoke else 30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10 if cuda else 2)
    precision = args.precision or ("bf16" if cuda else "fp32")
    workers = args.workers if args.workers is not None else (0 if args.smoke else min(16, os.cpu_count() or 1) if cuda else 2)
    kernels = args.kernels or ("auto" if cuda else "torch")
    gbs = args.interconnect_gbs or (400.0 if cuda else 10.0)
    full_loader, no_dali = resolve_full_loader(args.loader, device)
    command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    st = stamp(device)
    load_before = machine_load()
    print(f"bench_train on {st['device']} (torch {st['torch']}, {st['date']}): configs {configs}, batch {batches}, "
          f"{precision}, {warmup}+{steps} steps x {args.rounds} round(s), workers {workers}, full loader {full_loader}",
          flush=True)

    rows: List[Dict] = []
    estimates: Dict = {}
    for cname in configs:
        cfg = all_cfgs[cname]
        n_images = args.images or max(batches) * (warmup + steps) + max(batches)
        source = build_source(cfg, n_images, args.data, args.cache)
        for batch in batches:
            print(f"[{cname}, batch {batch}] {len(source)} images from {source.root}", flush=True)
            ctx = Context(cfg, device, batch, precision, workers, kernels, source, args.seed, no_dali_reason=no_dali)
            acc = measure(modes, ctx, full_loader, warmup, steps, args.rounds)
            group = []
            for m in modes:
                a = acc[m]
                row = {"config": cname, "batch": batch, "mode": m, "image_size": cfg.image_size,
                       "backbone": cfg.backbone + (" (CIFAR stem)" if cfg.cifar_stem else "")}
                if "skipped" in a:
                    row.update(status=a["skipped"])
                else:
                    row.update(status="ok", **summarise(a["times"], a["walls"], batch), peak_mem_gib=a["peak"],
                               details=a["details"], grad_bytes=a["grad_bytes"])
                group.append(row)
            by = {r["mode"]: r for r in group if r["status"] == "ok"}
            ceiling = by.get("fastbyol-synthetic")
            for r in group:
                if r["status"] != "ok" or not r["mode"].startswith(("fastbyol", "ablate")):
                    continue
                if ceiling and r["mode"] != "fastbyol-synthetic":
                    r["vs_ceiling"] = r["img_s"] / ceiling["img_s"]
                    if r["mode"] in ("fastbyol", "ablate-torch-loader"):
                        r["data_share"] = 1 - r["vs_ceiling"]
                for peer, key in (("lightly", "x_lightly"), ("byol-pytorch", "x_byol_pytorch")):
                    if peer in by:
                        r[key] = r["img_s"] / by[peer]["img_s"]
            rows += group
            ref = ceiling or by.get("fastbyol")
            if ref and (cname not in estimates or batch == 256):
                estimates[cname] = {"batch": batch, "step_ms": ref["step_ms"], "grad_mb": ref["grad_bytes"] / 1e6,
                                    "from_mode": ref["mode"],
                                    "rows": scaling_estimate(ref["step_ms"] / 1e3, ref["grad_bytes"], gbs)}

    result = {
        "benchmark": "bench_train", "stamp": st, "versions": versions(), "command": command, "device_type": device.type,
        "precision": precision, "workers": workers, "warmup": warmup, "steps": steps, "rounds": args.rounds,
        "kernels": kernels, "full_loader": full_loader, "rows": rows,
        "interconnect_gbs": gbs, "scaling_estimate": estimates,
        "machine_load": {"before": load_before, "after": machine_load()},
        "notes": [
            "img/s = batch / median step time; a step is timed from asking for the batch to the finished target "
            "update, synchronised; 'img_s_mean' is the segment mean (pipelined loaders).",
            "data share = 1 - e2e / ceiling, ceiling = fastbyol-synthetic (same step on views already on the device).",
            "Peers run their own loops unchanged except: the same encoder, head widths and autocast as fastbyol.",
            f"The fused loss/EMA run backend {kernels!r}: on CPU that is their torch reference (Triton needs CUDA), so "
            "ablate-eager-loss runs the same code as fastbyol and its difference is run-to-run noise."
            if not cuda else "",
            "Scaling rows are an ESTIMATE from the measured step time and fp32 gradient bytes at the stated bandwidth, "
            "ring all-reduce; SyncBatchNorm traffic ignored." if estimates else "",
            "Generated JPEGs are read from the page cache (a real ImageNet may not fit in RAM)."
            if any(all_cfgs[c].source == "jpeg" for c in configs) and not args.data else "",
        ],
    }
    result["notes"] = [n for n in result["notes"] if n]
    if args.scaling:
        print("gloo data-parallel scaling (CPU, measured):", flush=True)
        result["gloo_scaling"] = gloo_scaling(configs[0], batches[0], warmup, steps)
    result["targets"] = check_targets(rows, device)

    tag = f"bench_train_{device_tag(device)}_{'+'.join(configs)}"  # e.g. bench_train_cpu_smoke
    os.makedirs(args.out, exist_ok=True)
    result["json"] = write_json(result, tag + ".json", args.out)
    md = markdown_report(result)
    with open(os.path.join(args.out, tag + ".md"), "w") as fh:
        fh.write(md)
    result["png"] = plot(result, os.path.join(args.out, tag + ".png"))
    write_json(result, tag + ".json", args.out)
    print()
    print(md)
    print(f"wrote {result['json']}, {tag}.md" + (f", {tag}.png" if result["png"] else ""))
    return result


if __name__ == "__main__":
    main()
