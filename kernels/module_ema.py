"""Pair two modules by name, update the target from the online every step."""
from __future__ import annotations

import operator
from typing import List, Tuple

import torch
from torch import nn

from ._backend import BACKENDS
from .ema import Momentum, ema_update_

BUFFER_MODES = ("copy", "ema", "none")


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (``.module``), a DeepSpeed
    engine (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, any nesting. The
    wrappers share the inner module's tensors, so pairing the inner modules pairs the same
    tensors without the wrappers' name prefixes (``module.``, ``_orig_mod.``).

    Examples:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap(torch.nn.DataParallel(net)) is net
        True
    """
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch._dynamo's OptimizedModule
        if not isinstance(inner, nn.Module):
            wrapper = isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or any(
                c.__name__ == "DeepSpeedEngine" for c in type(module).__mro__)  # no deepspeed import
            inner = module.module if wrapper else None
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _pairs(kind: str, online: List[Tuple[str, torch.Tensor]], target: List[Tuple[str, torch.Tensor]]):
    """Tensors of both modules in matching order; the error names the first offending key."""
    for i in range(max(len(online), len(target))):
        on = online[i][0] if i < len(online) else None
        tn = target[i][0] if i < len(target) else None
        if on != tn:
            raise ValueError(f"ModuleEMA: {kind[:-1]} names differ at position {i}: online has "
                             f"{repr(on) if on else 'none'}, target has {repr(tn) if tn else 'none'}")
        o, t = online[i][1], target[i][1]
        if o.shape != t.shape:
            raise ValueError(f"ModuleEMA: {kind[:-1]} {on!r}: online shape {tuple(o.shape)} != target {tuple(t.shape)}")
        if kind == "parameters" and not (o.is_floating_point() and t.is_floating_point()):
            raise ValueError(f"ModuleEMA: parameter {on!r} is not floating point (online {o.dtype}, target {t.dtype})")
        if o is t or (o.numel() and o.data_ptr() == t.data_ptr()):
            raise ValueError(f"ModuleEMA: {kind[:-1]} {on!r} is the same tensor in online and target: the target "
                             f"must be a copy (e.g. copy.deepcopy(online))")
    return [o for _, o in online], [t for _, t in target]


def _slots(module: nn.Module, names: List[str], kind: str):
    """(owning dict, key) of each named parameter or buffer: where a re-binding shows."""
    out = []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        out.append((owner._parameters if kind == "parameters" else owner._buffers, leaf))
    return out


class ModuleEMA:
    """Exponential moving average of one module's weights into another's, fused.

    Parameters and buffers are paired by name (a mismatch raises naming the first offending
    key), then every :meth:`update` is one fused pass over all of them (:func:`ema_update_`:
    one launch per dtype pair) plus, for copied buffers, one ``_foreach_copy_``. The target
    is mutated in place; the online is only read. DDP, DeepSpeed-engine and ``torch.compile``
    wrappers on either side are looked through (:func:`unwrap`).

    Each update re-reads the modules' tensors from where they live (a dict lookup per
    tensor, host metadata only: no device sync) and re-pairs when any was re-bound, as the
    peers that re-read ``state_dict()`` every step do: ``load_state_dict(..., assign=True)``,
    ``.to()`` (which replaces buffers), replaced submodules. A ``.data`` swap keeps the
    tensor but moves its address, which the kernel's plan cache keys on.

    Args:
        online: the trained module.
        target: the averaged module (same architecture; its parameters are updated in place).
        buffers: floating-point buffers (BatchNorm running statistics) are ``copy``-ed from
            the online, averaged like parameters (``ema``), or left alone (``none``: the target
            keeps its own, as BYOL's reference). Integer buffers (``num_batches_tracked``) are
            copied in ``copy`` and ``ema`` modes, never averaged.
        backend: ``auto`` | ``triton`` | ``torch`` (see :func:`ema_update_`).
        stochastic_rounding: bf16 targets round stochastically (see :func:`ema_update_`);
            the stream advances every update from ``seed``.
        seed: the stochastic-rounding seed (equal on every rank: ranks round alike).

    Raises:
        ValueError: parameter or buffer names/shapes differ (the first offending key is
            named), a non-floating parameter, a target sharing the online's tensors, or an
            unknown ``buffers`` mode or backend.

    Examples:
        MoCo-style key encoder (He et al., 2020: momentum 0.999, BatchNorm statistics
        follow the query encoder)::

            key_encoder = copy.deepcopy(query_encoder).requires_grad_(False)
            ema = ModuleEMA(query_encoder, key_encoder, buffers="copy")
            for x_q, x_k in loader:
                loss = moco_loss(query_encoder(x_q), key_encoder(x_k))
                loss.backward(); opt.step(); opt.zero_grad()
                ema.update(0.999)

        Mean teacher (Tarvainen & Valpola, 2017: the teacher averages the student's weights
        and BatchNorm statistics; momentum ramps up)::

            teacher = copy.deepcopy(student).requires_grad_(False)
            ema = ModuleEMA(student, teacher, buffers="ema")
            for step, (x, y) in enumerate(loader):
                consistency_and_class_loss(student, teacher, x, y).backward(); opt.step(); opt.zero_grad()
                ema.update(min(0.999, (step + 1) / (step + 10)))

        BYOL target (the target keeps its own BatchNorm statistics); a 0-d device tensor as
        momentum keeps the step free of host syncs and CUDA-graph capturable::

            ema = ModuleEMA(online_encoder_and_projector, target, buffers="none")
            tau = torch.empty((), device="cuda", dtype=torch.float64)
            ...
            tau.fill_(1 - (1 - 0.996) * (math.cos(math.pi * step / total_steps) + 1) / 2)
            ema.update(tau)

        Runnable in a few lines:

        >>> online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> ema = ModuleEMA(online, target)
        >>> ema.update(0.0)  # momentum 0 copies the online
        >>> torch.equal(target.weight, online.weight)
        True
    """

    def __init__(self, online: nn.Module, target: nn.Module, buffers: str = "copy", backend: str = "auto",
                 stochastic_rounding: bool = False, seed: int = 0):
        if buffers not in BUFFER_MODES:
            raise ValueError(f"ModuleEMA: buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if backend not in BACKENDS:
            raise ValueError(f"ModuleEMA: backend must be one of {BACKENDS}, got {backend!r}")
        self.online, self.target = unwrap(online), unwrap(target)
        if self.online is self.target:
            raise ValueError("ModuleEMA: the target is the online module itself; the target must be a copy "
                             "(e.g. copy.deepcopy(online))")
        self.backend, self.buffers = backend, buffers
        self.stochastic_rounding, self.seed, self._calls = stochastic_rounding, seed, 0
        self._bind()

    def _bind(self) -> None:
        """Pair the modules' current tensors and remember where each lives."""
        online, target = self.online, self.target
        on_p, ta_p = list(online.named_parameters()), list(target.named_parameters())
        on_b, ta_b = list(online.named_buffers()), list(target.named_buffers())
        self.online_params, self.target_params = _pairs("parameters", on_p, ta_p)
        online_bufs, target_bufs = _pairs("buffers", on_b, ta_b)
        self.ema_sources, self.ema_targets = list(self.online_params), list(self.target_params)
        self.copy_sources, self.copy_targets = [], []
        if self.buffers != "none":
            for o, t in zip(online_bufs, target_bufs):
                if self.buffers == "ema" and o.is_floating_point():
                    self.ema_sources.append(o)
                    self.ema_targets.append(t)
                else:
                    self.copy_sources.append(o)
                    self.copy_targets.append(t)
        slots, bound = [], []
        for module, named_p, named_b in ((online, on_p, on_b), (target, ta_p, ta_b)):
            slots += _slots(module, [n for n, _ in named_p], "parameters") + _slots(module, [n for n, _ in named_b],
                                                                                    "buffers")
            bound += [t for _, t in named_p] + [t for _, t in named_b]
            subs = [(n, m) for n, m in module.named_modules() if n]  # a replaced submodule shows here
            slots += [(module.get_submodule(n.rpartition(".")[0])._modules, n.rpartition(".")[2]) for n, _ in subs]
            bound += [m for _, m in subs]
        # The bound tensors stay referenced here, so their ids cannot be reused by new ones.
        self._dicts, self._keys, self._bound = [d for d, _ in slots], [k for _, k in slots], bound

    def _rebound(self) -> bool:
        try:
            current = map(operator.getitem, self._dicts, self._keys)
            return not all(map(operator.is_, current, self._bound))
        except KeyError:  # a parameter or buffer was deleted
            return True

    @torch.no_grad()
    def update(self, momentum: Momentum) -> None:
        """``target ← m·target + (1 − m)·online`` over all paired tensors; buffers per mode.

        Args:
            momentum: a Python float in [0, 1] or a 1-element fp32/fp64 device tensor (read on
                device; see :func:`ema_update_` for what is checked where).
        """
        if self._rebound():
            self._bind()
        seed = (self.seed * 1_000_003 + self._calls) % (1 << 31)
        self._calls += 1
        ema_update_(self.ema_targets, self.ema_sources, momentum, backend=self.backend,
                    stochastic_rounding=self.stochastic_rounding, seed=seed)
        if self.copy_targets:
            torch._foreach_copy_(self.copy_targets, self.copy_sources)
