"""fastbyol's :class:`~fastbyol.trainer.Trainer` around a ready byol-pytorch learner and a user's
Dataset, for :class:`fastbyol.compat.byol_pytorch.BYOLTrainer` (instead of accelerate): checkpoints
that resume exactly, progress lines, ``metrics.jsonl``, a loss curve, and DeepSpeed when launched
on several ranks. The learner is duck-typed (``model``, ``net``, ``training_views``,
``moving_average_decay``, ``use_momentum``, ``kernels``), so this module sits below the one that
defines it."""
from __future__ import annotations

import os
from typing import Callable, Optional

from torch.utils.data import Dataset

from ..checkpoint import atomic_save
from ..config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from ..data.torch_dataset import DatasetTwoViewLoader
from ..distributed import close_process_group
from ..engines import LocalEngine
from ..launch import deepspeed_engine_factory
from ..parts import TrainerParts, build_parts
from ..runtime import dist_info_from_env
from ..trainer import Trainer

PRECISIONS = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


class DatasetTrainer(Trainer):
    """The fastbyol loop with byol-pytorch's constant learning rate and EMA factor, and
    step-based checkpoints of the user's network next to fastbyol's resumable one."""

    def __init__(self, cfg: Config, parts: TrainerParts, learner, learning_rate: float, checkpoint_every: int):
        super().__init__(cfg, parts)
        self.learner, self.learning_rate, self.checkpoint_every = learner, learning_rate, checkpoint_every
        self.monitor.total_steps = self.stop_step  # progress counts num_train_steps, not whole epochs

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


def precision_of(accelerator_kwargs: Optional[dict]) -> str:
    """fastbyol's ``train.precision`` for accelerate's ``mixed_precision``, the one accelerator
    argument with a meaning here."""
    accelerator_kwargs = dict(accelerator_kwargs or {})
    accelerator_kwargs.pop("kwargs_handlers", None)
    mixed = accelerator_kwargs.pop("mixed_precision", "no")
    if accelerator_kwargs:
        raise ValueError(f"BYOLTrainer: accelerator_kwargs {', '.join(sorted(accelerator_kwargs))} have no "
                         "fastbyol equivalent (only mixed_precision)")
    if mixed not in PRECISIONS:
        raise ValueError(f"BYOLTrainer: mixed_precision must be one of {', '.join(PRECISIONS)}, got {mixed!r}")
    return PRECISIONS[mixed]


def check_steps(num_train_steps, checkpoint_every, batch_size) -> None:
    for name, value in (("num_train_steps", num_train_steps), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"BYOLTrainer: {name} must be a positive int, got {value!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"BYOLTrainer: batch_size must be >= 2 (BatchNorm), got {batch_size!r}")


def dataset_trainer(learner, dataset: Dataset, *, learning_rate: float, num_train_steps: int, batch_size: int,
                    optimizer: Callable, checkpoint_every: int, checkpoint_folder: str, precision: str,
                    resume, seed: int, device: str, log_every: int, workers: int) -> DatasetTrainer:
    """The trainer of ``learner`` on ``dataset``: its parts (the user's Dataset, the learner's
    views and model, ``optimizer(params)`` on the local or DeepSpeed engine) and its config."""
    dist = dist_info_from_env()
    steps_per_epoch = len(dataset) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"BYOLTrainer: batch size {batch_size} is larger than the data set "
                         f"({len(dataset)} images)")
    if resume is True:
        resume = checkpoint_folder
    cfg = Config(
        preset="byol-pytorch",
        model=ModelConfig(projection_dim=learner.model.online.predictor[-1].out_features,
                          use_momentum=learner.use_momentum),
        optim=OptimConfig(base_lr=learning_rate, tau_base=learner.moving_average_decay, warmup_epochs=0),
        train=TrainConfig(batch_size=batch_size, epochs=-(-num_train_steps // steps_per_epoch),
                          max_steps=num_train_steps, precision=precision, seed=seed,
                          out=str(checkpoint_folder), resume=resume or None, device=device, log_every=log_every,
                          ckpt_every=0, knn_every=0, kernels=learner.kernels,
                          # lr and tau are constant here: the epoch count only says how long to
                          # run, so a resume may train for more steps than the first run asked.
                          resume_override="train.epochs"),
        data=DataConfig(workers=workers),
    )
    if dist.world_size > 1:
        engine_factory = deepspeed_engine_factory(cfg, dist, optimizer_factory=optimizer)
    else:
        def engine_factory(model, cfg, device, dist):
            return LocalEngine(model.online, optimizer(model.online.parameters()), device, cfg.train.precision,
                               cfg.dist.grad_accum, cfg.train.compile)

    def loader(source, micro_batch, device, dist):
        return DatasetTwoViewLoader(source, learner.training_views, micro_batch, device, cfg.train.seed,
                                    dist.rank, dist.world_size, cfg.data.workers)

    def model(device):
        learner.to(device)  # the user's network moves with it, in place
        return learner.model

    # The user's network, Dataset and optimizer are not in a Config: no config.yaml could rerun this.
    parts = build_parts(cfg, dist, sources=(dataset, None), loader_factory=loader, model_factory=model,
                        engine_factory=engine_factory, data_description=f"a {type(dataset).__name__}",
                        rerunnable=False)
    return DatasetTrainer(cfg, parts, learner, learning_rate, checkpoint_every)


def fit(trainer: Trainer) -> dict:
    """Train; on several ranks, leave the process group afterwards. The run summary."""
    summary = trainer.fit()
    if trainer.dist.world_size > 1:
        close_process_group()
    return summary
