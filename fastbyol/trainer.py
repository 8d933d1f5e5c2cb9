"""The training loop: data → BYOL forward → engine step → target EMA → schedules → monitors.

Resuming at step k reproduces the uninterrupted run exactly (on CPU): schedules are
functions of the step, data order a function of (seed, epoch), augmentation draws a
function of (seed, epoch, sample) and (seed, step), and the checkpoint holds the rest.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional

import torch

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint, rng_state, set_rng_state
from .config import Config
from .config_file import write_run_config
from .data.eval_views import eval_loader
from .distributed import sum_over_ranks
from .errors import EXIT_CODES, FastByolError
from .finite import describe_nonfinite, nonfinite_flag, state_tensors
from .eval.knn import knn_accuracy
from .monitor import Monitor, collapse_std
from .parts import EngineFactory, TrainerParts, batch_too_large, build_parts
from .resume import check_resume_config, resolve_resume
from .runtime import DistInfo, micro_batch_size
from .schedules import lr_at, scaled_lr, tau_at
from .stop import StopAgreement, StopSignals, TrainingStopped

log = logging.getLogger("fastbyol")

BN_BUFFER_MODES = {"own": "none", "ema": "ema", "copy": "copy"}


class Trainer:
    """Owns one run, from its parts (:mod:`fastbyol.parts`). ``Trainer.from_config(cfg).fit()``
    returns a summary dict.

    "Step" is an optimizer step throughout (``self.step``, ``steps_per_epoch``, schedules,
    checkpoints); the loader yields micro-batches, ``dist.grad_accum`` of them per step.
    """

    def __init__(self, cfg: Config, parts: TrainerParts):
        self.cfg, self.dist, self.device = cfg, parts.dist, parts.device
        t = cfg.train
        self.train_src, self.val_src = parts.train_src, parts.val_src
        self.loader, self.model, self.engine = parts.loader, parts.model, parts.engine
        self.micro_batch = micro_batch_size(cfg, self.dist.world_size)
        self.steps_per_epoch = len(self.loader) // cfg.dist.grad_accum
        if self.steps_per_epoch < 1:
            raise FastByolError(batch_too_large(cfg, len(self.train_src), parts.data_description))
        self.total_steps = t.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, t.max_steps or self.total_steps)
        self.peak_lr = scaled_lr(cfg.optim.base_lr, t.batch_size)
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.step = 0
        self.knn_random: Optional[float] = None
        self._nonfinite: Optional[torch.Tensor] = None  # set by start_steps
        self.monitor = Monitor(t.out, self.total_steps, t.batch_size, cfg.model.projection_dim,
                               enabled=self.dist.is_main, knn_label=f"weighted kNN (k={t.knn_k}, T={t.knn_t})")
        self.ckpt_path = os.path.join(t.out, CHECKPOINT_NAME)
        self._saved_step: Optional[int] = None  # the step of the checkpoint on disk (this run's or resumed)
        self._finite_step: Optional[int] = None  # the last step _check_finite passed (the state is unchanged until the next)
        self._signals: Optional[StopSignals] = None  # set by fit
        resume = resolve_resume(t.resume, t.out)
        if resume:
            self._resume(resume)
        else:
            self.monitor.rewrite([])  # a fresh run starts a fresh metrics.jsonl
        if self.dist.is_main and parts.rerunnable:
            write_run_config(cfg, t.out)  # <out>/config.yaml: `fastbyol train --config` reruns the run

    @classmethod
    def from_config(cls, cfg: Config, dist: Optional[DistInfo] = None,
                    engine_factory: Optional[EngineFactory] = None) -> "Trainer":
        """The run ``cfg`` describes: :func:`~fastbyol.parts.build_parts`, then the trainer.
        ``engine_factory(model, cfg, device, dist) -> engine`` swaps in another engine."""
        return cls(cfg, build_parts(cfg, dist, engine_factory=engine_factory))

    # ------------------------------------------------------------------ schedules (a subclass may replace them;
    # fastbyol.compat.byol_pytorch's trainer: byol-pytorch's constant lr and tau)
    def lr_at(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.peak_lr, self.warmup_steps)

    def tau_at(self, step: int) -> float:
        return tau_at(step, self.total_steps, self.cfg.optim.tau_base)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> Dict:
        return {
            "config": self.cfg.to_dict(), "step": self.step, "online": self.model.online.state_dict(),
            "target": self.model.target.state_dict() if self.model.target is not None else None,
            "rng": rng_state(), "knn_random": self.knn_random, "history": self.monitor.history,
        }

    def save(self) -> None:
        """Checkpoint the current step, only from a finite state (else :meth:`_check_finite` raises);
        a step already on disk is not written again (for DeepSpeed that would rewrite its tag in place)."""
        if self._saved_step == self.step:
            return
        self._check_finite()
        self.engine.save(self.ckpt_path, self._state(), self.cfg.train.keep_last, final=self.step >= self.stop_step)
        self._saved_step, self._last_save_time = self.step, time.monotonic()

    def _resume(self, path: str) -> None:
        path = resolve_checkpoint(path)
        state = load_checkpoint(path)
        changed = check_resume_config(state.get("config"), self.cfg.to_dict(), self.cfg.train.resume_override, path)
        if changed and self.dist.is_main:
            log.warning("resuming with changed settings (--train.resume_override): %s",
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed))
        state = self.engine.load(path, state)
        try:
            self.model.online.load_state_dict(state["online"])
            if self.model.target is not None:
                self.model.target.load_state_dict(state["target"])
        except RuntimeError as e:
            raise FastByolError(f"checkpoint {path!r} does not match this model: {str(e).splitlines()[0]}") from None
        self.step = int(state["step"])
        self.knn_random = state.get("knn_random")
        self.monitor.rewrite(state.get("history") or [])  # metrics.jsonl back to the checkpoint's step
        set_rng_state(state["rng"])
        self._saved_step = self.step
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ evaluation
    def knn(self, encoder=None) -> float:
        """Weighted kNN top-1 on all ranks: each extracts its shard of the bank and of the
        queries, the bank is gathered, each votes for its queries (:mod:`fastbyol.eval.knn`)."""
        t, rank, world = self.cfg.train, self.dist.rank, self.dist.world_size
        workers = self.cfg.data.workers
        size = self.cfg.augment.image_size
        bank = eval_loader(self.train_src, size, 256, workers, t.knn_max_train, t.seed, rank, world)
        query = eval_loader(self.val_src, size, 256, workers, t.knn_max_query, t.seed, rank=rank, world_size=world)
        return knn_accuracy(encoder or self.model.online.encoder, bank, query, len(self.train_src.classes),
                            self.device, self.cfg.augment, t.knn_k, t.knn_t)

    def _state_tensors(self):
        return state_tensors(self.model.online, self.model.target, getattr(self.engine, "optimizer", None))
    def _knn_at(self, step: int, epoch: int) -> float:
        """kNN top-1 after ``step``, logged; taken from the history when this step's kNN ran
        before an interruption (a resumed run does not repeat it)."""
        done = [r["knn_top1"] for r in self.monitor.history if "knn_top1" in r and r["step"] == step]
        if done:
            return done[-1]
        top1 = self.knn()
        self.monitor.log_knn(step, epoch, top1)
        return top1

    def _check_finite(self) -> None:
        """Raise unless the loss since the last check and the whole state (online, target, BatchNorm
        statistics, optimizer) are finite on every rank: one device reduction, read here (log and
        checkpoint steps only), all-reduced with several ranks so that they stop together. A step
        already checked (a log step that also checkpoints) is not checked again."""
        if self._finite_step == self.step:
            return
        named = self._state_tensors()
        state_bad = nonfinite_flag(named).to(self.device)
        loss_bad = self._nonfinite if self._nonfinite is not None else torch.zeros((), dtype=torch.bool,
                                                                                   device=self.device)
        flags = torch.stack([loss_bad, state_bad]).to(torch.int32)
        if self.dist.world_size > 1:
            import torch.distributed as tdist

            local = flags.clone()
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        else:
            local = flags
        loss_any, state_any = flags.tolist()
        if not (loss_any or state_any):
            self._finite_step = self.step
            return
        where = []
        if loss_any:
            where.append("the loss is NaN or inf" if local[0] else "the loss is NaN or inf on another rank")
        if state_any:
            where.append((describe_nonfinite(named) or "") if local[1] else "the state is non-finite on another rank")
        kept = (f"the last finite checkpoint is kept ({self.ckpt_path}, step {self._saved_step})"
                if self._saved_step is not None else "no checkpoint was written")
        raise FastByolError(f"non-finite training state by step {self.step}: {'; '.join(where)}; stopping: {kept}; "
                            "try a lower --optim.base_lr or --train.precision fp32")

    def _poll_stop(self):
        """(stop, checkpoint due) after an applied step, the same on every rank (:mod:`fastbyol.stop`)."""
        minutes = self.cfg.train.ckpt_every_minutes
        due = bool(minutes) and time.monotonic() - self._last_save_time >= 60 * minutes
        requested = self._signals.requested if self._signals is not None else None
        code, due = self._stop_agreement.poll(self.step, EXIT_CODES[requested] if requested else 0, due)
        every = self.cfg.train.ckpt_every_steps
        stop = next((name for name, c in EXIT_CODES.items() if c == code), None)  # the signal's name, or None
        return stop, due or bool(every and self.step % every == 0)

    # ------------------------------------------------------------------ one step
    def start_steps(self) -> None:
        """Device-side state of the step (flags, loss accumulator) and the schedules at
        ``self.step``; called by :meth:`fit`, and by anyone driving :meth:`train_micro_batch`
        alone (the throughput benchmark times exactly that method)."""
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_n = 0
        self._buffers = BN_BUFFER_MODES[self.cfg.model.bn_buffers]
        self.tau = self.tau_at(self.step)
        self.lr = self.lr_at(self.step)
        self.engine.set_lr(self.lr)
        self.model.train()

    def train_micro_batch(self, batch):
        """Forward, backward and engine step of one micro-batch; at an applied optimizer step
        also the target EMA, ``self.step += 1`` and the schedules. Returns the BYOL output and
        whether an optimizer step was applied. No host sync (the loss stays on the device)."""
        with self.engine.autocast():
            out = self.model(batch.view1, batch.view2, online=self.engine.module)
        self.engine.backward(out.loss)
        loss = out.loss.detach().float()
        self._nonfinite |= ~torch.isfinite(loss)
        self._loss_sum += loss
        self._loss_n += 1
        if not self.engine.step():
            return out, False
        self.tau = self.tau_at(self.step)
        self.model.update_target(self.tau, self._buffers, self.cfg.train.kernels, source=self.engine.ema_source())
        self.step += 1
        self.lr = self.lr_at(self.step)
        self.engine.set_lr(self.lr)
        return out, True

    def _mean_loss(self) -> float:
        """The mean loss since the last call (a host sync: log steps only)."""
        mean = (self._loss_sum / max(1, self._loss_n)).item()
        self._loss_sum.zero_()
        self._loss_n = 0
        return mean

    # ------------------------------------------------------------------ loop
    def fit(self) -> Dict:
        cfg, t = self.cfg, self.cfg.train
        run_knn = t.knn_every > 0  # on every rank: the kNN is sharded
        if run_knn and t.knn_at_start and self.knn_random is None and self.step == 0:
            self.knn_random = self._knn_at(0, -1)
        accum = cfg.dist.grad_accum
        self._signals = StopSignals(announce=self.dist.is_main).install()
        try:
            return self._fit_loop(run_knn, accum)
        finally:
            self._signals.restore()

    def _fit_loop(self, run_knn: bool, accum: int) -> Dict:
        t = self.cfg.train
        self._stop_agreement = StopAgreement(self.dist.world_size, self.device, t.stop_check_every)
        self._last_save_time = time.monotonic()
        self.start_steps()
        t_start, step_start = time.perf_counter(), self.step
        last_knn = None
        micro_batches_per_epoch = self.steps_per_epoch * accum  # the loader may hold a few more (a partial step)
        while self.step < self.stop_step:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            micro = in_epoch * accum  # the epoch's next micro-batch
            self.loader.set_epoch(epoch, start_micro_batch=micro)
            step_before = self.step
            for batch in self.loader:
                out, stepped = self.train_micro_batch(batch)
                micro += 1
                if not stepped:
                    if micro >= micro_batches_per_epoch:
                        break
                    continue
                if self.step % t.log_every == 0 or self.step == self.stop_step:
                    self._check_finite()
                    self.monitor.log_step(self.step, epoch, t.epochs, self._mean_loss(), self.lr, self.tau,
                                          collapse_std(out.z).item(), self.loader.skipped)
                stop, due = self._poll_stop()
                if (stop or due) and self.step < self.stop_step:
                    self.save()  # the final step's checkpoint is written below
                if stop and self.step < self.stop_step:
                    raise TrainingStopped(stop, self.step, self.ckpt_path)
                if self.step >= self.stop_step or micro >= micro_batches_per_epoch:
                    break
            if self.step == step_before:
                raise FastByolError(f"epoch {epoch + 1} produced no trainable batch "
                                    f"({self.loader.skipped} unreadable images so far)")
            epoch_done = self.step % self.steps_per_epoch == 0
            finished = self.step >= self.stop_step
            done_epochs = self.step // self.steps_per_epoch
            if epoch_done and run_knn and (done_epochs % t.knn_every == 0 or finished):
                last_knn = self._knn_at(self.step, done_epochs - 1)
            if finished or (epoch_done and t.ckpt_every and done_epochs % t.ckpt_every == 0):
                self.save()
        if run_knn and last_knn is None:
            last_knn = self._knn_at(self.step, self.step // self.steps_per_epoch)
        elapsed = time.perf_counter() - t_start
        summary = {
            "steps": self.step, "epochs": self.step / self.steps_per_epoch, "seconds": elapsed,
            "images_per_s": (self.step - step_start) * t.batch_size / max(elapsed, 1e-9),
            "knn_top1": last_knn, "knn_top1_random_init": self.knn_random,
            "skipped_files": sum_over_ranks(self.loader.skipped, self.device), "checkpoint": self.ckpt_path,
        }
        plot = self.monitor.close()
        summary["curves"] = plot
        return summary
