"""The peers' modes, each with the peer package itself: lightly's BYOL example loop and
byol-pytorch's README loop (same encoder, head widths and autocast as fastbyol's).
A peer that is not installed is a ``Skip`` whose reason says how to install it."""
from __future__ import annotations

import torch

from .backbone import peer_backbone
from .configs import Context, Skip
from .data import forever, peer_loader
from .fastbyol_runner import Runner
from .lightly_style import LightlyExampleLoop

# The smallest set that imports (lightly 1.6's transforms need lightning-utilities; byol-pytorch's
# learner needs einops; --no-deps so pip cannot replace torch).
PEER_INSTALL = ("pip install --no-deps lightly==1.6.0 lightning-utilities==0.15.3 byol-pytorch==0.9.1 "
                "einops==0.8.2")


class LightlyRunner(LightlyExampleLoop):
    """lightly's BYOL example (lightly/examples/pytorch/byol.py), faithfully, with the lightly
    package itself: its heads, transforms, loss, momentum update and schedule around the
    example's model class and SGD. Head widths are the benchmark's (the example's are
    512 → 1024 → 256); the forward runs under the same autocast as fastbyol's (a no-op in fp32)."""

    def __init__(self, ctx: Context, synthetic: bool = False):
        try:
            from lightly.loss import NegativeCosineSimilarity
            from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
            from lightly.models.utils import update_momentum
            from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
            from lightly.utils.scheduler import cosine_schedule
        except Exception as e:
            raise Skip(f"lightly not importable ({type(e).__name__}: {e}); {PEER_INSTALL}") from None
        import lightly

        c = ctx.cfg

        def make_transform():
            blur = {} if c.peer_blur is None else {"gaussian_blur": c.peer_blur}
            return BYOLTransform(view_1_transform=BYOLView1Transform(input_size=c.image_size, **blur),
                                 view_2_transform=BYOLView2Transform(input_size=c.image_size, **blur))

        super().__init__(ctx, synthetic, BYOLProjectionHead, BYOLPredictionHead, NegativeCosineSimilarity(),
                         update_momentum, cosine_schedule, make_transform)
        self.details = {
            "loader": "pre-made views on the device" if synthetic else
            f"lightly BYOLTransform (PIL, per image) in a torch DataLoader, {ctx.workers} workers",
            "loss": "lightly NegativeCosineSimilarity", "ema": "lightly update_momentum (foreach mul + add)",
            "optimizer": "SGD lr 0.06 (example)", "precision": ctx.precision, "lightly": lightly.__version__,
        }


def import_byol_pytorch():
    """byol-pytorch's ``BYOL`` learner class, and how it was loaded.

    The package's ``__init__`` also imports its ``accelerate``-based trainer; where accelerate
    is not installed, the learner module (``byol_pytorch/byol_pytorch.py``, which needs only
    torch, torchvision and einops) is loaded on its own, unchanged."""
    try:
        from byol_pytorch import BYOL

        return BYOL, "import byol_pytorch"
    except ImportError as e:
        from fastbyol.bench.common import load_byol_pytorch_learner

        try:
            mod = load_byol_pytorch_learner()
        except ImportError as e2:
            raise Skip(str(e2)) from None
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
