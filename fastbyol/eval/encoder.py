"""The encoder to evaluate, from whatever a user has: a fastbyol checkpoint or run folder (its
online encoder), an exported encoder (``fastbyol export``: a state_dict and, beside it,
``<file>.json``, its training record, which becomes :attr:`LoadedEncoder.config`), a torchvision
``state_dict`` (its ``fc`` classifier dropped, e.g. supervised weights), or random weights.

A state_dict's architecture is recognised from its tensors (``convnet4``, ``resnet18|34|50``,
ImageNet or CIFAR stem); ``backbone`` checks it instead. Anything else is a one-line
:class:`~fastbyol.errors.FastByolError`: a checkpoint that is not fastbyol's or torchvision's,
or one whose encoder does not match ``backbone``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..backbones import build_encoder
from ..checkpoint import (encoder_state_dict, export_record_path, load_checkpoint, read_export_record,
                          resolve_checkpoint)
from ..config import BACKBONE_NAMES, Config, config_from_dict
from ..errors import FastByolError

CLASSIFIER_PREFIXES = ("fc.",)  # torchvision's classifier: not part of the encoder
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "model.")  # DDP, solo-learn, Lightning


@dataclass
class LoadedEncoder:
    """An encoder ready to evaluate and where it came from."""

    encoder: nn.Module
    backbone: str
    cifar_stem: bool
    kind: str  # "fastbyol checkpoint" | "fastbyol export" | "state_dict" | "random init"
    network: str  # which network the weights are: "online encoder", "random init", "state_dict"
    source: Optional[str]  # the file read (None: random init)
    config: Optional[Config] = None  # the training config: fastbyol checkpoints and exports
    step: Optional[int] = None  # the checkpoint's training step
    notes: List[str] = field(default_factory=list)

    def describe(self) -> str:
        arch = f"{self.backbone}{' (CIFAR stem)' if self.cifar_stem else ''}"
        if self.kind == "random init":
            return f"random-init {arch}"
        where = f"{self.source}" + (f", step {self.step}" if self.step is not None else "")
        return f"{self.network} of {self.kind} {where} ({arch})"

    def to_dict(self) -> Dict:
        return {"description": self.describe(), "kind": self.kind, "network": self.network, "source": self.source,
                "backbone": self.backbone, "cifar_stem": self.cifar_stem, "step": self.step, "notes": self.notes}


@lru_cache(maxsize=None)
def _layout(name: str, cifar_stem: bool) -> Dict[str, Tuple[int, ...]]:
    """Tensor names and shapes of an encoder's state_dict (built on the meta device: instant)."""
    with torch.device("meta"):
        enc, _ = build_encoder(name, cifar_stem)
    return {k: tuple(v.shape) for k, v in enc.state_dict().items()}


def _compare(sd: Dict[str, torch.Tensor], arch: Tuple[str, bool]) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, other-shape) keys of ``sd`` against architecture ``arch``."""
    want = _layout(*arch)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shape = [f"{k!r} {list(sd[k].shape)} vs {list(want[k])}" for k in want
             if k in sd and tuple(sd[k].shape) != want[k]]
    return missing, unexpected, shape


def _candidates(backbone: Optional[str], sd: Dict[str, torch.Tensor]) -> List[Tuple[str, bool]]:
    """Architectures to try: ``backbone`` (its stem read off ``conv1``), or every one."""
    conv1 = sd.get("conv1.weight")
    stems = [bool(conv1 is not None and conv1.shape[-1] == 3)]
    names = [backbone] if backbone else ["convnet4", "resnet18", "resnet34", "resnet50"]
    return [(n, n != "convnet4" and stems[0]) for n in names]


def _strip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the classifier and wrapper prefixes every key shares (``module.``, ``backbone.``...)."""
    changed = True
    while changed and sd:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd, changed = {k[len(p):]: v for k, v in sd.items()}, True
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES)}


def _tensor_dict(obj) -> Optional[Dict[str, torch.Tensor]]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # Lightning / solo-learn / timm-style wrappers
            if isinstance(obj.get(key), dict) and "online" not in obj:
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
    return None


def _from_state_dict(sd: Dict[str, torch.Tensor], backbone: Optional[str], path: str, what: str
                     ) -> Tuple[nn.Module, str, bool]:
    """Build the matching encoder and load ``sd`` into it (strictly)."""
    for name, stem in _candidates(backbone, sd):
        if not any(_compare(sd, (name, stem))):
            enc, _ = build_encoder(name, stem)
            enc.load_state_dict(sd)
            return enc, name, stem
    foreign = (f"{path}: not a fastbyol or torchvision checkpoint: its {len(sd)} tensors (e.g. {next(iter(sd))!r}) "
               f"match none of fastbyol's encoders ({', '.join(BACKBONE_NAMES)})")
    if backbone is None:
        raise FastByolError(foreign + "; pass --backbone to see what differs")
    arch = _candidates(backbone, sd)[0]
    guess = [n for n, st in _candidates(None, sd) if not any(_compare(sd, (n, st)))]
    if not guess and not set(sd) & set(_layout(*arch)):
        raise FastByolError(foreign)
    missing, unexpected, shape = _compare(sd, arch)
    parts = [f"{len(missing)} missing (e.g. {missing[0]!r})"] if missing else []
    parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})"] if unexpected else []
    parts += [f"{len(shape)} of another shape (e.g. {shape[0]})"] if shape else []
    raise FastByolError(f"{path}: {what} does not match --backbone {backbone}: " + ", ".join(parts)
                        + (f"; it is a {guess[0]} encoder" if guess else ""))


def load_encoder(path: Optional[str], backbone: Optional[str] = None, random_init: bool = False, seed: Optional[int] = None,
                 cifar_stem: Optional[bool] = None) -> LoadedEncoder:
    """The encoder of ``path`` (see the module doc), or with ``random_init`` random weights of
    ``path``'s architecture (or of ``backbone``), drawn as training draws them for ``seed``
    (default: a fastbyol checkpoint's own seed, so exactly the encoder its training started
    from; else 0).

    Raises:
        FastByolError: unreadable or foreign file, or an encoder that does not match ``backbone``.
    """
    if backbone is not None and backbone not in BACKBONE_NAMES:
        raise FastByolError(f"--backbone {backbone!r} is not one of {', '.join(BACKBONE_NAMES)}")
    if path is None:
        if not random_init:
            raise FastByolError("give a checkpoint (file or run folder) or --random-init")
        name = backbone or "convnet4"
        torch.manual_seed(seed or 0)
        enc, _ = build_encoder(name, bool(cifar_stem))
        return LoadedEncoder(enc, name, bool(cifar_stem), "random init", "random init", None)
    file = resolve_checkpoint(path) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FastByolError(f"no checkpoint at {path!r}")
    obj = load_checkpoint(file)
    if isinstance(obj, dict) and "online" in obj and "config" in obj:  # fastbyol's own
        cfg = config_from_dict(obj["config"])
        name, stem = cfg.model.backbone, cfg.model.cifar_stem
        if backbone is not None and backbone != name:
            raise FastByolError(f"{file}: its encoder is a {name}, not --backbone {backbone}")
        if random_init:
            torch.manual_seed(cfg.train.seed if seed is None else seed)
            enc, _ = build_encoder(name, stem)
            return LoadedEncoder(enc, name, stem, "random init", "random init", None, config=cfg,
                                 notes=[f"architecture and data of {file}"])
        sd = encoder_state_dict(obj)
        if any(_compare(sd, (name, stem))):
            raise FastByolError(f"{file}: its online encoder does not match its own config ({name}); "
                                "was it trained with a custom module? Evaluate it from Python instead")
        enc, _ = build_encoder(name, stem)
        enc.load_state_dict(sd)
        return LoadedEncoder(enc, name, stem, "fastbyol checkpoint", "online encoder", file, config=cfg,
                             step=int(obj.get("step", 0)))
    sd = _tensor_dict(obj)
    if sd is None:
        kind = type(obj).__name__
        keys = f" with keys {', '.join(map(str, list(obj)[:4]))}" if isinstance(obj, dict) else ""
        raise FastByolError(f"{file}: not a fastbyol checkpoint nor a state_dict of tensors (found a {kind}{keys})")
    had_fc = any(k.startswith(CLASSIFIER_PREFIXES) for k in sd)
    sd = _strip(sd)
    if not sd:
        raise FastByolError(f"{file}: holds only a classifier (fc.*), no encoder")
    enc, name, stem = _from_state_dict(sd, backbone, file, "its state_dict")
    cfg, record = None, read_export_record(file)  # `fastbyol export`'s <file>.json
    if record is not None:
        cfg = config_from_dict(record["config"])
        if (cfg.model.backbone, cfg.model.cifar_stem) != (name, stem):
            raise FastByolError(f"{export_record_path(file)} describes a {cfg.model.backbone} "
                                f"(cifar_stem {cfg.model.cifar_stem}) but {file} holds a {name} (cifar_stem {stem}): "
                                "a record left from another export; delete it and pass --image-size")
    if random_init:
        torch.manual_seed((cfg.train.seed if cfg is not None else 0) if seed is None else seed)
        enc, _ = build_encoder(name, stem)
        return LoadedEncoder(enc, name, stem, "random init", "random init", None, config=cfg,
                             notes=[f"architecture{' and data' if cfg is not None else ''} of {file}"])
    notes = ["classifier fc.* dropped"] if had_fc else []
    if cfg is not None:
        return LoadedEncoder(enc, name, stem, "fastbyol export", "online encoder", file, config=cfg,
                             step=record.get("step"), notes=notes + [f"training record {export_record_path(file)}"])
    return LoadedEncoder(enc, name, stem, "state_dict", "encoder", file, notes=notes)
