"""byol-pytorch's ``BYOLTrainer`` on fastbyol's :class:`~fastbyol.trainer.Trainer` instead of
accelerate: the same arguments, plus checkpoints that resume exactly, progress lines,
``metrics.jsonl`` and a loss curve, and DeepSpeed when launched on several ranks."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.optim import Adam
from torch.utils.data import Dataset

from ..checkpoint import atomic_save
from ..config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from ..data.torch_dataset import DatasetTwoViewLoader
from ..engines import LocalEngine
from ..runtime import DistInfo, dist_info_from_env
from ..trainer import Trainer
from .byol_pytorch import BYOL

PRECISIONS = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


class _DatasetTrainer(Trainer):
    """The fastbyol loop around a ready learner and a user Dataset, with byol-pytorch's
    constant learning rate and EMA factor, and step-based checkpoints."""

    def __init__(self, cfg: Config, dist: DistInfo, learner: BYOL, dataset: Dataset, learning_rate: float,
                 checkpoint_every: int, engine_factory=None):
        self.learner, self.dataset = learner, dataset
        self.learning_rate, self.checkpoint_every = learning_rate, checkpoint_every
        super().__init__(cfg, dist, engine_factory=engine_factory)
        self.monitor.total_steps = self.stop_step  # progress counts num_train_steps, not whole epochs

    def sources(self):
        return self.dataset, None

    def data_description(self) -> str:
        return f"a {type(self.dataset).__name__}"

    def train_loader(self):
        return DatasetTwoViewLoader(self.dataset, self.learner.training_views, self.micro_batch, self.device,
                                    self.cfg.train.seed, self.dist.rank, self.dist.world_size, self.cfg.data.workers)

    def build_model(self):
        self.learner.to(self.device)  # the user's network moves with it, in place
        return self.learner.model

    def write_config(self) -> None:
        pass  # the user's network, Dataset and optimizer are not in a Config: no file could rerun this run

    def lr_at(self, step: int) -> float:
        return self.learning_rate

    def tau_at(self, step: int) -> float:
        return self.learner.moving_average_decay if self.learner.use_momentum else 1.0

    def train_micro_batch(self, batch):
        out, stepped = super().train_micro_batch(batch)
        if stepped and self.step % self.checkpoint_every == 0 and self.step < self.stop_step:
            self.save()
        return out, stepped

    def save(self) -> None:
        """fastbyol's resumable ``checkpoint.pt``, then (rank 0) the network's weights as
        ``checkpoint.<step // checkpoint_every>.pt`` (``checkpoint.last.pt`` between multiples)."""
        super().save()
        if self.dist.is_main:
            k = self.step // self.checkpoint_every if self.step % self.checkpoint_every == 0 else "last"
            atomic_save(self.learner.net.state_dict(), os.path.join(self.cfg.train.out, f"checkpoint.{k}.pt"))


class BYOLTrainer:
    """Train ``net`` with BYOL on ``dataset`` (byol-pytorch's trainer, argument for argument).

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

    def __init__(self, net: torch.nn.Module, *, image_size: int, hidden_layer, learning_rate: float,
                 dataset: Dataset, num_train_steps: int, batch_size: int = 16, optimizer_klass=Adam,
                 checkpoint_every: int = 1000, checkpoint_folder: str = "./checkpoints",
                 byol_kwargs: Optional[dict] = None, optimizer_kwargs: Optional[dict] = None,
                 accelerator_kwargs: Optional[dict] = None, resume=False, seed: int = 0, device: str = "auto",
                 log_every: int = 10, workers: int = 0):
        accelerator_kwargs = dict(accelerator_kwargs or {})
        accelerator_kwargs.pop("kwargs_handlers", None)
        mixed = accelerator_kwargs.pop("mixed_precision", "no")
        if accelerator_kwargs:
            raise ValueError(f"BYOLTrainer: accelerator_kwargs {', '.join(sorted(accelerator_kwargs))} have no "
                             "fastbyol equivalent (only mixed_precision)")
        if mixed not in PRECISIONS:
            raise ValueError(f"BYOLTrainer: mixed_precision must be one of {', '.join(PRECISIONS)}, got {mixed!r}")
        for name, value in (("num_train_steps", num_train_steps), ("checkpoint_every", checkpoint_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BYOLTrainer: {name} must be a positive int, got {value!r}")
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"BYOLTrainer: batch_size must be >= 2 (BatchNorm), got {batch_size!r}")
        self.net = net
        self.byol = BYOL(net, image_size=image_size, hidden_layer=hidden_layer, **(byol_kwargs or {}))
        dist = dist_info_from_env()
        steps_per_epoch = len(dataset) // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"BYOLTrainer: batch size {batch_size} is larger than the data set "
                             f"({len(dataset)} images)")
        if resume is True:
            resume = checkpoint_folder
        cfg = Config(
            preset="byol-pytorch",
            model=ModelConfig(projection_dim=self.byol.model.online.predictor[-1].out_features,
                              use_momentum=self.byol.use_momentum),
            optim=OptimConfig(base_lr=learning_rate, tau_base=self.byol.moving_average_decay, warmup_epochs=0),
            train=TrainConfig(batch_size=batch_size, epochs=-(-num_train_steps // steps_per_epoch),
                              max_steps=num_train_steps, precision=PRECISIONS[mixed], seed=seed,
                              out=str(checkpoint_folder), resume=resume or None, device=device, log_every=log_every,
                              ckpt_every=0, knn_every=0, kernels=self.byol.kernels,
                              # lr and tau are constant here: the epoch count only says how long to
                              # run, so a resume may train for more steps than the first run asked.
                              resume_override="train.epochs"),
            data=DataConfig(workers=workers),
        )
        opt_kwargs = dict(optimizer_kwargs or {})

        def optimizer(params):
            return optimizer_klass(params, lr=learning_rate, **opt_kwargs)

        if dist.world_size > 1:
            from ..launch import deepspeed_trainer

            self.trainer = deepspeed_trainer(cfg, dist, trainer_cls=_DatasetTrainer, optimizer_factory=optimizer,
                                             learner=self.byol, dataset=dataset, learning_rate=learning_rate,
                                             checkpoint_every=checkpoint_every)
        else:
            def local_engine(model, cfg, device, dist):
                return LocalEngine(model.online, optimizer(model.online.parameters()), device, cfg.train.precision,
                                   cfg.dist.grad_accum, cfg.train.compile)

            self.trainer = _DatasetTrainer(cfg, dist, self.byol, dataset, learning_rate, checkpoint_every,
                                           engine_factory=local_engine)
        self.optimizer = self.trainer.engine.optimizer

    def __call__(self) -> dict:
        """Train for ``num_train_steps`` (from the resumed step on); the run summary."""
        summary = self.trainer.fit()
        if self.trainer.dist.world_size > 1:
            from ..distributed import close_process_group

            close_process_group()
        return summary

    forward = __call__
