"""byol-pytorch's API (lucidrains, README of 0.9.1), with fastbyol underneath.

Change ``from byol_pytorch import BYOL`` to ``from fastbyol.compat.byol_pytorch import BYOL``;
the arguments and calls stay. Underneath: :class:`fastbyol.model.BYOL` (each view forwarded on
its own, the fused :func:`fastbyol_kernels.byol_loss`), BYOL's two asymmetric views drawn per
image and made on the images' device in one batched pass (:class:`fastbyol.batch_views.TwoViews`),
the one-pass fused EMA (:class:`fastbyol_kernels.ModuleEMA`), and for :class:`BYOLTrainer`
fastbyol's trainer (checkpoints, exact resume, progress lines and curves). README.md's
"Coming from byol-pytorch" table lists every difference.

Examples:
    >>> import torch, torchvision
    >>> resnet = torchvision.models.resnet18()
    >>> learner = BYOL(resnet, image_size=32, hidden_layer="avgpool", projection_hidden_size=64)
    >>> opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    >>> loss = learner(torch.rand(4, 3, 32, 32))
    >>> opt.zero_grad(); loss.backward(); opt.step(); learner.update_moving_average()
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Union

import torch
import torch.distributed as tdist
from torch import nn
from torch.optim import Adam
from torch.utils.data import Dataset

from fastbyol_kernels import byol_loss

from ..batch_views import TwoViews
from ..config import AugmentConfig
from ..model import BYOL as FastBYOL
from ..sync_batchnorm import convert_to_sync_free
from .byol_pytorch_trainer import check_steps, dataset_trainer, fit, precision_of

__all__ = ["BYOL", "BYOLTrainer", "MockDataset", "default_augment_config"]


def default_augment_config(image_size: int) -> AugmentConfig:
    """BYOL's two asymmetric views (BYOL_SPEC) at ``image_size``, ImageNet normalisation."""
    return AugmentConfig(image_size=image_size)


def simsiam_mlp(dim: int, projection_size: int, hidden_size: int) -> nn.Sequential:
    """byol-pytorch's projector when ``use_momentum=False`` (SimSiam's 3-layer MLP, no biases,
    a parameter-free BatchNorm on the output)."""
    return nn.Sequential(
        nn.Linear(dim, hidden_size, bias=False), nn.BatchNorm1d(hidden_size), nn.ReLU(inplace=True),
        nn.Linear(hidden_size, hidden_size, bias=False), nn.BatchNorm1d(hidden_size), nn.ReLU(inplace=True),
        nn.Linear(hidden_size, projection_size, bias=False), nn.BatchNorm1d(projection_size, affine=False),
    )


def hidden_layer_name(net: nn.Module, hidden_layer: Union[str, int, None]) -> Union[str, None]:
    """byol-pytorch's ``hidden_layer`` as a :class:`~fastbyol.backbones.HiddenLayer` name:
    a name from ``named_modules()``, an index into ``children()`` (``-1``: the network's
    own output, ``""`` the root module), or ``None`` (fastbyol's detection: the input of a
    final ``nn.Linear`` child)."""
    if hidden_layer is None:
        return None
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, (str, int)):
        raise ValueError(f"hidden_layer must be a module name or a child index, got {hidden_layer!r}")
    if isinstance(hidden_layer, int):
        if hidden_layer == -1:
            return ""  # byol-pytorch: the network's output itself
        children = [name for name, _ in net.named_children()]
        if not -len(children) <= hidden_layer < len(children):
            raise ValueError(f"hidden layer ({hidden_layer}) not found: {type(net).__name__} has "
                             f"{len(children)} children ({', '.join(children)})")
        return children[hidden_layer]
    names = [name for name, _ in net.named_modules()]
    if hidden_layer not in names:
        shown = ", ".join(repr(n) for n in names[1:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"hidden layer ({hidden_layer!r}) not found in {type(net).__name__}; its modules: {shown}")
    return hidden_layer


class BYOL(nn.Module):
    """byol-pytorch's learner: wrap ``net``, call ``learner(images)`` for the loss.

    Args:
        net: any image network; it is trained in place (save ``net.state_dict()`` afterwards).
        image_size: side of the views (and of the dummy input that sizes the projector).
        hidden_layer: the layer whose (flattened) output is the representation: a name from
            ``net.named_modules()`` or an index into ``net.children()`` (default ``-2``;
            ``-1`` is the network's output).
        projection_size, projection_hidden_size: projector and predictor widths (256, 4096).
        augment_fn, augment_fn2: callables ``images -> view``; default: BYOL's two asymmetric
            views, drawn per image, on the images' device (``augment_fn2`` defaults to
            ``augment_fn`` when only that one is given, as in byol-pytorch).
        moving_average_decay: the target's EMA factor τ (constant, as byol-pytorch).
        use_momentum: ``False``: no target network; the online projection with stop-gradient
            is the target, and the projector is byol-pytorch's SimSiam MLP.
        sync_batchnorm: projector BatchNorm synchronised over ranks (fastbyol's
            :class:`~fastbyol.sync_batchnorm.SyncFreeBatchNorm`); ``None``: when a process group
            of more than one rank is initialised (byol-pytorch's rule).
        use_simplicial_embeddings: only ``False`` (the README's and the paper's network).
        views_in_one_batch: ``True`` (byol-pytorch's way): both views go through the networks as
            one ``2B`` batch, so BatchNorm statistics are over both; ``False``: one forward per
            view, per-view statistics, as the BYOL reference and ``fastbyol train``.
        kernels: backend of the fused loss, EMA and default views' photometry,
            ``auto|triton|torch`` (fastbyol's ``train.kernels``); default
            ``BYOL.default_kernels`` (``auto``).

    Raises:
        ValueError: a ``hidden_layer`` that does not exist; at call time, images that are not
            a float ``[B, 3, H, W]`` batch, whose features do not fit the projector, or a batch
            of one in training mode (BatchNorm).
    """

    default_kernels = "auto"

    def __init__(self, net: nn.Module, image_size: int, hidden_layer: Union[str, int, None] = -2,
                 projection_size: int = 256, projection_hidden_size: int = 4096,
                 augment_fn: Optional[Callable] = None, augment_fn2: Optional[Callable] = None,
                 moving_average_decay: float = 0.99, use_momentum: bool = True,
                 sync_batchnorm: Optional[bool] = None, use_simplicial_embeddings: bool = False,
                 views_in_one_batch: bool = True, kernels: Optional[str] = None, **simplicial_kwargs):
        super().__init__()
        if use_simplicial_embeddings:
            raise ValueError("use_simplicial_embeddings=True is not supported: fastbyol builds the README's "
                             "and the paper's projector (byol-pytorch 0.9.1's default differs)")
        unknown = set(simplicial_kwargs) - {"sem_num_simplices", "sem_simplex_dim", "sem_temperature"}
        if unknown:
            raise TypeError(f"BYOL() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not 0.0 <= moving_average_decay <= 1.0:
            raise ValueError(f"moving_average_decay must be in [0, 1], got {moving_average_decay}")
        self.image_size, self.hidden_layer = image_size, hidden_layer
        self.moving_average_decay, self.use_momentum = moving_average_decay, use_momentum
        self.kernels = kernels or self.default_kernels
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, got {self.kernels!r}")
        device = next(net.parameters()).device
        self.model = FastBYOL(net, hidden_layer=hidden_layer_name(net, hidden_layer), image_size=image_size,
                              projector_hidden=projection_hidden_size, projection_dim=projection_size,
                              predictor_hidden=projection_hidden_size, use_momentum=use_momentum,
                              views_in_one_batch=views_in_one_batch,
                              loss_fn=functools.partial(byol_loss, backend=self.kernels))
        online = self.model.online
        if not use_momentum:
            online.projector = simsiam_mlp(self.model.feature_dim, projection_size, projection_hidden_size)
        if sync_batchnorm is None:
            sync_batchnorm = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
        if sync_batchnorm:
            # fastbyol's synchronised BatchNorm: the maths of nn.SyncBatchNorm, without its host
            # syncs, and on any backend (gloo too)
            online.projector = convert_to_sync_free(online.projector)
            if self.model.target is not None:
                self.model.target.projector = convert_to_sync_free(self.model.target.projector)
        online.projector.register_forward_pre_hook(self._check_features)
        self.to(device)
        # User augmentations as byol-pytorch pairs them (None: fastbyol's view for that side).
        self.augment1, self.augment2 = augment_fn, augment_fn2 if augment_fn2 is not None else augment_fn
        self.default_views = TwoViews(default_augment_config(image_size), kernels=self.kernels)
        self._input_hw = None
        self._target_reset = False  # reset, not yet re-copied by a training forward (byol-pytorch's lazy target)

    # ------------------------------------------------------------------ byol-pytorch's API
    @property
    def net(self) -> nn.Module:
        """The user's network (trained in place)."""
        return self.model.online.encoder.net

    def forward(self, x: torch.Tensor, return_embedding: bool = False, return_projection: bool = True):
        """The symmetric BYOL loss (a scalar) of two augmentations of ``x``; with
        ``return_embedding``, ``(projection, representation)`` of ``x`` itself (the online
        network's, no augmentation), or the representation alone with ``return_projection=False``."""
        self._check_images(x)
        online = self.model.online
        if return_embedding:
            with self._size_errors(x):
                representation = online.encoder(x)
                if not return_projection:
                    return representation
                return online.projector(representation), representation
        self._copy_reset_target()
        v1, v2 = self.views(x)
        with self._size_errors(v1):
            return self.model(v1, v2).loss

    def views(self, x: torch.Tensor, keys=None):
        """The two augmented views of ``x`` (the default ones from one batched pass)."""
        if self.augment1 is None and self.augment2 is None:
            return self.default_views(x, keys)
        v1 = self.augment1(x) if self.augment1 is not None else TwoViews(self.default_views.cfg, (0,), self.kernels)(x, keys)
        v2 = self.augment2(x) if self.augment2 is not None else TwoViews(self.default_views.cfg, (1,), self.kernels)(x, keys)
        return v1, v2

    def training_views(self, x: torch.Tensor, keys=None):
        """:meth:`views` after the input checks (the trainer's data path calls this)."""
        self._check_images(x)
        self._copy_reset_target()
        return self.views(x, keys)

    @torch.no_grad()
    def update_moving_average(self) -> None:
        """ξ ← τ·ξ + (1 − τ)·θ over the target encoder and projector (parameters; the target's
        BatchNorm statistics stay its own), τ = ``moving_average_decay``, one fused pass."""
        if not self.use_momentum:
            raise ValueError("update_moving_average: there is no moving average with use_momentum=False "
                             "(the target is the online network)")
        self._copy_reset_target()
        self.model.update_target(self.moving_average_decay, buffers="none", backend=self.kernels)

    @torch.no_grad()
    def reset_moving_average(self) -> None:
        """The target becomes a copy of the online encoder and projector again: now, and once
        more at the next training forward (byol-pytorch deletes its target and rebuilds it there,
        from the online network as it is then; ``target_encoder`` is ``None`` until then)."""
        if self.model.target is not None:
            self._copy_online_to_target()
            self._target_reset = True

    @property
    def target_encoder(self) -> Optional[nn.Module]:
        """The target encoder and projector (byol-pytorch's ``target_encoder``); ``None`` with
        ``use_momentum=False``, and after a reset until the next training forward, as there."""
        return None if self._target_reset else self.model.target

    def __setattr__(self, name: str, value) -> None:
        # byol-pytorch code resets the target with `learner.target_encoder = None` (its
        # reset_moving_average does exactly that); nn.Module.__setattr__ would store the None
        # (or register a module) beside the real target and change nothing.
        if name == "target_encoder":
            if value is not None:
                raise ValueError("target_encoder can only be set to None (a reset: the target becomes a copy of "
                                 f"the online network); got a {type(value).__name__}")
            self.reset_moving_average()
            return
        super().__setattr__(name, value)

    def _copy_online_to_target(self) -> None:
        self.model.target.encoder.load_state_dict(self.model.online.encoder.state_dict())
        self.model.target.projector.load_state_dict(self.model.online.projector.state_dict())

    @torch.no_grad()
    def _copy_reset_target(self) -> None:
        if self._target_reset:
            self._copy_online_to_target()
            self._target_reset = False

    # ------------------------------------------------------------------ checks
    def _check_images(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must be a [batch, 3, height, width] tensor, got {shape}")
        if x.shape[1] != 3:
            raise ValueError(f"images must have 3 channels, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"images must be floating point (e.g. in [0, 1]), got {x.dtype}")
        if self.training and x.shape[0] == 1:
            raise ValueError("a batch of one image cannot be trained on: the projector's BatchNorm needs "
                             "more than one sample (use a larger batch, or learner.eval() for embeddings)")
        self._input_hw = tuple(x.shape[2:])

    @contextlib.contextmanager
    def _size_errors(self, x: torch.Tensor):
        """A shape error inside the network, for inputs of another size than the learner was
        built for, as one ValueError that says so."""
        try:
            yield
        except RuntimeError as e:
            if tuple(x.shape[2:]) == (self.image_size, self.image_size):
                raise
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"the network cannot take {x.shape[2]}x{x.shape[3]} inputs ({first}); this learner "
                             f"was built for image_size {self.image_size}") from None

    def _check_features(self, module, inputs) -> None:
        width, want = inputs[0].shape[-1], self.model.feature_dim
        if inputs[0].dim() != 2 or width != want:
            raise ValueError(
                f"hidden layer {self.hidden_layer!r} gives {tuple(inputs[0].shape[1:])} features for "
                f"{self._input_hw} inputs, the projector was built for {want} ({self.image_size}x{self.image_size} "
                "images): pass images (or views) of image_size, or build the learner with their size")

    # ------------------------------------------------------------------ migration
    def load_byol_pytorch_state_dict(self, state: dict) -> None:
        """Load a byol-pytorch ``BYOL.state_dict()`` (same network, simplicial embeddings
        off): ``online_encoder.{net,projector}`` → online encoder and projector,
        ``online_predictor`` → predictor, ``target_encoder.{net,projector}`` → target."""
        prefixes = {"online_encoder.net.": "online.encoder.net.", "online_encoder.projector.": "online.projector.",
                    "online_predictor.": "online.predictor.", "target_encoder.net.": "target.encoder.net.",
                    "target_encoder.projector.": "target.projector."}
        mapped = {}
        for key, value in state.items():
            for old, new in prefixes.items():
                if key.startswith(old):
                    mapped[new + key[len(old):]] = value
        if self.model.target is not None and not any(k.startswith("target.") for k in mapped):
            for key in list(mapped):  # a byol-pytorch learner whose target was never built
                if key.startswith(("online.encoder.", "online.projector.")):
                    mapped["target." + key[len("online."):]] = mapped[key]
        self.model.load_state_dict(mapped)


class MockDataset(Dataset):
    """``length`` random ``[3, image_size, image_size]`` images (byol-pytorch's MockDataset);
    image ``i`` is the same on every read (a generator seeded by ``i``), so a resumed run
    sees the images it would have seen."""

    def __init__(self, image_size: int, length: int):
        self.image_size, self.length = image_size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> torch.Tensor:
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        g = torch.Generator().manual_seed(int(idx))
        return torch.randn(3, self.image_size, self.image_size, generator=g)


class BYOLTrainer:
    """Train ``net`` with BYOL on ``dataset`` (byol-pytorch's trainer, argument for argument), on
    fastbyol's trainer instead of accelerate (:mod:`~fastbyol.compat.byol_pytorch_trainer`).

    Args:
        net, image_size, hidden_layer, byol_kwargs: the learner (:class:`BYOL`).
        learning_rate, optimizer_klass, optimizer_kwargs: the optimizer, built over the online
            network (encoder, projector, predictor) with a constant learning rate.
        dataset: a map-style Dataset of image tensors / PIL images / ``(image, ...)`` tuples.
        num_train_steps: optimizer steps; batch_size: the global batch (full batches only).
        checkpoint_every, checkpoint_folder: every that many steps (and at the end), the
            network's weights go to ``<folder>/checkpoint.<n>.pt`` and fastbyol's resumable state
            to ``<folder>/checkpoint.pt``.
        accelerator_kwargs: only ``mixed_precision`` (``no|bf16|fp16``) has a meaning here.
        resume: ``True`` (from ``<folder>/checkpoint.pt``) or a checkpoint path: continue an
            interrupted run exactly where it stopped.
        seed, device, log_every, workers: fastbyol's ``train.seed``, ``train.device``,
            ``train.log_every`` and ``data.workers``.

    ``trainer()`` runs and returns fastbyol's run summary. Launched by ``deepspeed`` or
    ``torchrun`` on several ranks, it runs on fastbyol's DeepSpeed engine (the batch is split
    over the ranks).
    """

    def __init__(self, net: nn.Module, *, image_size: int, hidden_layer, learning_rate: float,
                 dataset: Dataset, num_train_steps: int, batch_size: int = 16, optimizer_klass=Adam,
                 checkpoint_every: int = 1000, checkpoint_folder: str = "./checkpoints",
                 byol_kwargs: Optional[dict] = None, optimizer_kwargs: Optional[dict] = None,
                 accelerator_kwargs: Optional[dict] = None, resume=False, seed: int = 0, device: str = "auto",
                 log_every: int = 10, workers: int = 0):
        precision = precision_of(accelerator_kwargs)
        check_steps(num_train_steps, checkpoint_every, batch_size)
        self.net = net
        self.byol = BYOL(net, image_size=image_size, hidden_layer=hidden_layer, **(byol_kwargs or {}))
        opt_kwargs = dict(optimizer_kwargs or {})

        def optimizer(params):
            return optimizer_klass(params, lr=learning_rate, **opt_kwargs)

        self.trainer = dataset_trainer(
            self.byol, dataset, learning_rate=learning_rate, num_train_steps=num_train_steps,
            batch_size=batch_size, optimizer=optimizer, checkpoint_every=checkpoint_every,
            checkpoint_folder=checkpoint_folder, precision=precision, resume=resume, seed=seed, device=device,
            log_every=log_every, workers=workers)
        self.optimizer = self.trainer.engine.optimizer

    def __call__(self) -> dict:
        """Train for ``num_train_steps`` (from the resumed step on); the run summary."""
        return fit(self.trainer)

    forward = __call__
