"""lightly's BYOL example, written out in plain torch: the baseline gpu-check compares against
on any machine, with or without the lightly package.

It is the loop of lightly 1.6's ``examples/pytorch/byol.py`` with each lightly piece replaced by
its body (lightly 1.6.0 source): ``BYOLProjectionHead`` / ``BYOLPredictionHead`` (Linear → BN →
ReLU → Linear), ``update_momentum`` (``_foreach_mul_`` then ``_foreach_add_``),
``NegativeCosineSimilarity`` (``-cosine_similarity(...).mean()``), ``cosine_schedule``, SGD lr
0.06, four forward passes per step, and ``BYOLTransform``'s per-image PIL augmentation in a
DataLoader. Head widths, encoder and autocast are the benchmark's, as for the real peers.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import peer_backbone
from .configs import Context
from .data import forever, peer_loader, synthetic_views
from .fastbyol_runner import Runner


def projection_head(d_in: int, hidden: int, d_out: int) -> nn.Module:
    """lightly's BYOLProjectionHead / BYOLPredictionHead (no bias before the BatchNorm, as lightly's)."""
    return nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """lightly 1.6's update_momentum."""
    ema = list(model_ema.parameters())
    torch._foreach_mul_(ema, m)
    torch._foreach_add_(ema, list(model.parameters()), alpha=1.0 - m)


def negative_cosine_similarity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(x0, x1, 1, 1e-8).mean()


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float) -> float:
    """lightly 1.6's (no ``period``): the end value from step max_steps - 1 on."""
    if max_steps <= 1 or step >= max_steps - 1:
        return end_value
    return end_value - (end_value - start_value) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2


class _PILBlur:
    """lightly's GaussianBlur: PIL's filter, sigma ~ U(0.1, 2), with probability ``prob``."""

    def __init__(self, prob: float, sigmas=(0.1, 2.0)):
        self.prob, self.sigmas = prob, sigmas

    def __call__(self, img):
        from PIL import ImageFilter

        if np.random.random_sample() < self.prob:
            img = img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(*self.sigmas)))
        return img


class _PILSolarize:
    def __init__(self, prob: float):
        self.prob = prob

    def __call__(self, img):
        from PIL import ImageOps

        return ImageOps.solarize(img, threshold=128) if np.random.random_sample() < self.prob else img


def byol_view_transform(size: int, blur: float, solarize: float):
    """lightly's BYOLView1Transform (blur 1.0, solarize 0.0) / BYOLView2Transform (0.1, 0.2)."""
    import torchvision.transforms as T

    return T.Compose([T.RandomResizedCrop(size=size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(0.5),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                      _PILBlur(blur), _PILSolarize(solarize), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


class TwoViews:
    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return [self.t1(img), self.t2(img)]


class LightlyStyleBYOL(nn.Module):
    """The example's model class, around given heads (lightly's, or :func:`projection_head`)."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, prediction: nn.Module):
        super().__init__()
        self.backbone, self.projection_head, self.prediction_head = backbone, projection, prediction
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        for p in list(self.backbone_momentum.parameters()) + list(self.projection_head_momentum.parameters()):
            p.requires_grad = False  # lightly's deactivate_requires_grad

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


class LightlyExampleLoop(Runner):
    """lightly 1.6's ``examples/pytorch/byol.py`` loop, its pieces given: the projection and
    prediction heads (``make_*(d_in, hidden, d_out)``), the loss, ``update_momentum``, ``cosine_schedule``
    and the two-view transform (``make_transform()``, built only for real data); ``synthetic``:
    on pre-made device views. Shared by the lightly-package mode and the torch-only one."""

    def __init__(self, ctx: Context, synthetic: bool, make_projection, make_prediction, loss_fn, update_momentum,
                 cosine_schedule, make_transform):
        self.ctx, c = ctx, ctx.cfg
        self.loss_fn, self.update_momentum = loss_fn, update_momentum
        torch.manual_seed(ctx.seed)
        resnet, feat_dim = peer_backbone(c)
        backbone = resnet if c.backbone == "convnet4" else nn.Sequential(*list(resnet.children())[:-1])
        self.model = LightlyStyleBYOL(backbone, make_projection(feat_dim, c.projector_hidden, c.projection_dim),
                                      make_prediction(c.projection_dim, c.predictor_hidden, c.projection_dim)
                                      ).to(ctx.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.06)
        self.momentum_val = cosine_schedule(0, 10, 0.996, 1)
        self.online_params = [p for p in self.model.parameters() if p.requires_grad]
        self.total_loss = torch.zeros((), device=ctx.device)
        self.synthetic = synthetic
        if synthetic:
            self.views = synthetic_views(ctx, channels_last=False)
        else:
            self.loader = peer_loader(ctx, make_transform())

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
            loss = 0.5 * (self.loss_fn(p0, z1) + self.loss_fn(p1, z0))
        self.total_loss += loss.detach()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


class LightlyStyleRunner(LightlyExampleLoop):
    """The example's loop with every lightly piece written out in torch (no lightly import)."""

    def __init__(self, ctx: Context, synthetic: bool = False):
        c = ctx.cfg

        def make_transform():
            b1, b2 = (1.0, 0.1) if c.peer_blur is None else (c.peer_blur, c.peer_blur)
            return TwoViews(byol_view_transform(c.image_size, b1, 0.0), byol_view_transform(c.image_size, b2, 0.2))

        super().__init__(ctx, synthetic, projection_head, projection_head, negative_cosine_similarity,
                         update_momentum, cosine_schedule, make_transform)
        self.details = {
            "loop": "lightly 1.6 examples/pytorch/byol.py, written out in torch (no lightly import)",
            "loader": "pre-made views on the device" if synthetic else
            f"BYOLTransform-equivalent PIL transforms per image in a torch DataLoader, {ctx.workers} workers",
            "loss": "-cosine_similarity().mean()", "ema": "update_momentum (foreach mul + add)",
            "optimizer": "SGD lr 0.06 (example)", "precision": ctx.precision,
        }
