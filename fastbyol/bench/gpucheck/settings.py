"""What each gpu-check part runs, on a GPU and in ``--tiny`` (CPU, seconds, what CI runs)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List

# Targets (README / DEVELOPERS.md). The throughput ones are stated for one H100.
E2E_IMG_S = 1900.0  # ResNet-50 @224, bf16, end to end
E2E_VS_CEILING = 0.95
VS_LIGHTLY_STYLE = 3.0
EMA_X_FLOOR = 1.15
LOSS_X_FLOOR = 2.0
LOSS_VS_EAGER = 3.0
LARS_X_FLOOR = 1.5
DALI_IMG_S = 5000.0  # both views, ResNet-50 input size


@dataclass
class Part:
    name: str  # what --parts takes
    letter: str  # the part (a-f)
    title: str
    cap_s: float  # its own wall-clock cap (seconds) on a GPU; --tiny uses tiny_cap_s
    tiny_cap_s: float = 120.0


# Order: cheapest and most telling first; torch.compile (minutes of compilation) last but DALI.
PARTS: List[Part] = [
    Part("kernels", "a", "compiled-kernel correctness vs float64", 120),
    Part("micro", "b", "EMA, loss and LARS vs byte floors and eager / _foreach baselines", 90),
    # Sustained windows (>= 3 x workers x prefetch = 192 steps at 16 workers) for the 6 modes with a loader.
    Part("e2e-r50", "c", "ResNet-50 @224: compute, loader and sustained end to end per loop", 300),
    Part("e2e-cifar", "c", "ResNet-18 CIFAR @32: compute, loader and sustained end to end per loop", 120),
    Part("syncs", "e", "host syncs per step (torch.cuda.set_sync_debug_mode)", 45),
    Part("finite", "g", "the NaN / inf guard (_foreach_norm(inf)) catches an injected NaN or inf", 30),
    Part("model", "h", "the step cost model (fastbyol cost) against this run's measured stages", 60),
    Part("e2e-r50-compile", "c", "end to end, ResNet-50 @224 with torch.compile", 180),
    Part("dali", "f", "DALI pipeline images/s and end to end with DALI", 90),
]
PART_NAMES = [p.name for p in PARTS]


@dataclass
class Settings:
    tiny: bool
    batch: Dict[str, int] = field(default_factory=dict)  # per bench config
    warmup: int = 5
    steps: int = 15
    compile_warmup: int = 3
    precision: str = "bf16"
    kernels: str = "auto"
    workers: int = 0  # wanted; shrunk by loader_budget() to what /dev/shm holds
    prefetch: int = 4  # batches in flight per worker (fastbyol.data.torch_loader's prefetch_factor)
    configs: Dict[str, str] = field(default_factory=dict)  # part -> fastbyol.bench.train config name
    budget_s: float = 540.0  # the whole run: one call of a lent GPU machine (10 min) with room to start


def settings(tiny: bool) -> Settings:
    if tiny:  # convnet4 at 16 px through the same code paths (JPEG folder; CIFAR batches)
        return Settings(tiny=True, batch={"smoke": 8, "smoke-cifar": 8}, warmup=1, steps=2, compile_warmup=1,
                        precision="fp32", kernels="torch", workers=0,
                        configs={"e2e-r50": "smoke", "e2e-cifar": "smoke-cifar", "e2e-r50-compile": "smoke",
                                 "syncs": "smoke-cifar", "dali": "smoke"}, budget_s=600.0)
    return Settings(tiny=False, batch={"imagenet-resnet50": 256, "cifar-resnet18": 256}, warmup=5, steps=15,
                    compile_warmup=3, precision="bf16", kernels="auto", workers=min(16, os.cpu_count() or 1),
                    configs={"e2e-r50": "imagenet-resnet50", "e2e-cifar": "cifar-resnet18",
                             "e2e-r50-compile": "imagenet-resnet50", "syncs": "cifar-resnet18",
                             "dali": "imagenet-resnet50"})


def loader_budget(want_workers: int, prefetch: int, batch_bytes: int, shm: str = "/dev/shm") -> Dict:
    """Workers that fit: DataLoader workers hand batches over through ``/dev/shm``, and
    ``workers x prefetch`` batches may sit there at once (a default container has 64 MB: 16
    workers x 4 x 77 MB die with a bus error). Keeps them within half of its free space, so the
    row runs (with fewer workers, said in the record) instead of failing. Also records the
    machine's free memory."""
    try:
        st = os.statvfs(shm)
        shm_total, shm_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    except OSError:
        shm_total = shm_free = None
    mem_free = None
    try:
        with open("/proc/meminfo") as fh:
            mem_free = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    room = min(x for x in (shm_free, mem_free) if x is not None) // 2 if (shm_free or mem_free) else None
    workers = want_workers
    if room is not None and want_workers > 0:
        workers = max(0, min(want_workers, room // max(1, prefetch * batch_bytes)))
    note = None
    if workers < want_workers:
        note = (f"loader workers {want_workers} -> {workers}: {want_workers} x {prefetch} prefetch x "
                f"{batch_bytes / 2 ** 20:.0f} MiB batches do not fit in half of /dev/shm's "
                f"{(shm_free or 0) / 2 ** 20:.0f} MiB free" + (" (0: batches load in the main process)"
                                                                 if workers == 0 else ""))
    return {"workers": workers, "wanted_workers": want_workers, "prefetch": prefetch, "batch_mib": batch_bytes / 2 ** 20,
            "shm_total_mib": shm_total and shm_total / 2 ** 20, "shm_free_mib": shm_free and shm_free / 2 ** 20,
            "mem_available_gib": mem_free and mem_free / 2 ** 30, "note": note}


def sustained_steps(steps: int, workers: int, prefetch: int) -> int:
    """Timed steps after warm-up: at least 3 x workers x prefetch, so that the batches already
    waiting when timing starts are a third of the window at most."""
    return max(steps, 3 * workers * prefetch)


class PartSkip(Exception):
    """A part that cannot run here (no CUDA, DALI not installed, ...): the message is the reason."""
