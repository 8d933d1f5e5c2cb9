"""What a long run shows: progress lines, metrics JSONL, TensorBoard, the collapse
detector, and a PNG of the loss and kNN curves at the end."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("fastbyol")


def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the batch std of L2-normalised projections: ≈ 1/√d when
    healthy, → 0 on collapse (a 0-d tensor; no host sync)."""
    return F.normalize(z.float(), dim=1).std(0).mean()


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Monitor:
    """Collects per-step scalars and writes them where people look.

    Only :meth:`log_step` reads tensors back (``.item()``), every ``log_every`` steps.
    """

    def __init__(self, out_dir: str, total_steps: int, batch_size: int, projection_dim: int,
                 enabled: bool = True, stream=None, knn_label: str = "weighted kNN"):
        self.out_dir, self.total_steps, self.batch_size = out_dir, total_steps, batch_size
        self.enabled, self.knn_label = enabled, knn_label
        self.stream = stream or sys.stdout
        self.healthy_std = 1.0 / math.sqrt(projection_dim)
        self.history: List[Dict] = []
        self._t0, self._t_last, self._step_last = time.perf_counter(), time.perf_counter(), None
        self._warned_collapse = False
        self._tb = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:  # tensorboard not installed: JSONL and the PNG still hold everything
                self._tb = None

    def rewrite(self, history: List[Dict]) -> None:
        """Make ``history`` the whole record, ``metrics.jsonl`` included (atomically): a fresh run
        starts an empty file, a resumed one goes back to its checkpoint's step, so records written
        after that checkpoint by a killed run are not repeated."""
        self.history = list(history)
        if not self.enabled:
            return
        path = self._jsonl.name
        self._jsonl.close()
        with open(f"{path}.tmp", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.history)
        os.replace(f"{path}.tmp", path)
        self._jsonl = open(path, "a", buffering=1)
        last = max((r["step"] for r in self.history), default=None)
        if self._tb is not None and last is not None:  # TensorBoard's own crash recovery: drop later events
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(os.path.join(self.out_dir, "tb"), purge_step=last + 1)

    def write(self, record: Dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def log_step(self, step: int, epoch: int, epochs: int, loss: float, lr: float, tau: float, std: float,
                 skipped_files: int = 0) -> Dict:
        now = time.perf_counter()
        if self._step_last is None:
            ips, self._step_last = float("nan"), step
        else:
            ips = (step - self._step_last) * self.batch_size / max(1e-9, now - self._t_last)
        self._t_last, self._step_last = now, step
        eta = (self.total_steps - step) * self.batch_size / ips if ips == ips and ips > 0 else float("nan")
        rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "tau": tau, "proj_std": std,
               "images_per_s": ips if ips == ips else None,  # None: first line, nothing timed yet (JSON has no NaN)
               "skipped_files": skipped_files, "time": now - self._t0}
        self.write(rec)
        if self.enabled:
            eta_s = format_duration(eta) if eta == eta else "?"
            ips_s = f"{ips:,.0f}" if ips == ips else "?"
            print(f"epoch {epoch + 1}/{epochs} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.4g} "
                  f"tau {tau:.5f} std {std:.4f} img/s {ips_s} eta {eta_s}", file=self.stream, flush=True)
        if std < 0.2 * self.healthy_std and not self._warned_collapse:
            self._warned_collapse = True
            log.warning("projections are collapsing: std %.4f vs %.4f when healthy (1/sqrt(d))", std, self.healthy_std)
        return rec

    def log_knn(self, step: int, epoch: int, top1: float) -> None:
        self.write({"step": step, "epoch": epoch, "knn_top1": top1})
        if self.enabled:
            print(f"epoch {epoch + 1} step {step} kNN top-1 {top1:.2f}%", file=self.stream, flush=True)

    def close(self) -> Optional[str]:
        """Flush, and draw ``curves.png``; returns its path (None without matplotlib)."""
        if not self.enabled:
            return None
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        return plot_curves(self.history, os.path.join(self.out_dir, "curves.png"), self.knn_label)


def headless_pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files, no screen), or None where matplotlib is
    missing or does not load: a plot is never worth failing a run or a benchmark for."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def plot_curves(history: List[Dict], path: str, knn_label: str = "weighted kNN") -> Optional[str]:
    """Loss (and kNN top-1, when measured) against step."""
    plt = headless_pyplot()
    if plt is None:
        log.info("matplotlib not installed: no curves.png")
        return None
    steps = [r["step"] for r in history if "loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in history if "knn_top1" in r]
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(11 if knn else 6, 4), squeeze=False)
    axes[0][0].plot(steps, [r["loss"] for r in history if "loss" in r])
    axes[0][0].set(xlabel="step", ylabel="BYOL loss", title="training loss")
    if knn:
        axes[0][1].plot([s for s, _ in knn], [a for _, a in knn], marker="o")
        axes[0][1].set(xlabel="step", ylabel="top-1 (%)", title=knn_label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
