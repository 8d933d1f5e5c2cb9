"""Runs kept as files: ``fastbyol train --config FILE`` and the ``config.yaml`` every run writes.

A config file is :meth:`Config.to_dict` as YAML or JSON, nested by section::

    preset: default
    optim:
      base_lr: 0.1
    augment:
      view2:
        solarize_p: 0.2

Any subset of fields may be given; the rest come from the preset (the file's ``preset`` key,
else the one ``fastbyol train`` would pick). Command-line flags override the file. Unknown
sections or fields are a one-line error naming the key, as for flags.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, get_args, get_origin

from .config import Config, field_types, parse_value, set_field
from .errors import FastByolError

RUN_CONFIG_NAMES = ("config.yaml", "config.json")  # what a run writes: YAML when PyYAML is installed


def _yaml():
    try:
        import yaml
    except ImportError:
        return None
    return yaml


def read_config_file(path: str) -> Dict[str, Any]:
    """The file's values, flattened to ``{"optim.base_lr": 0.1, "preset": "default", ...}``;
    every key checked against :class:`Config` (values are checked by :func:`apply_config_values`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise FastByolError(f"cannot read --config {path!r}: {e.strerror or e}") from None
    yaml = _yaml()
    try:
        if path.endswith(".json") or yaml is None:
            tree = json.loads(text) if text.strip() else {}
        else:
            tree = yaml.safe_load(text) or {}
    except Exception as e:  # a syntax error: json's and yaml's messages carry the line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FastByolError(f"--config {path}: not valid {'JSON' if path.endswith('.json') or yaml is None else 'YAML'}: "
                            f"{first}") from None
    if not isinstance(tree, dict):
        raise FastByolError(f"--config {path}: expected a mapping of sections (model:, optim:, ...), "
                            f"got {type(tree).__name__}")
    known = set(field_types(Config()))
    sections = {name.rsplit(".", 1)[0] for name in known if "." in name}
    flat: Dict[str, Any] = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                if name not in sections:
                    raise FastByolError(f"--config {path}: unknown config section {name!r}")
                walk(name + ".", value)
            elif name in known:
                flat[name] = value
            elif name in sections:
                raise FastByolError(f"--config {path}: {name} must be a mapping of its fields, got {value!r}")
            else:
                raise FastByolError(f"--config {path}: unknown config field {name!r}")

    walk("", tree)
    return flat


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """A YAML/JSON value as the field's type, through the same parser as a command-line flag."""
    optional = get_origin(typ) is not None and type(None) in get_args(typ)
    if value is None:
        if not optional:
            raise FastByolError(f"config field {name}: null is not allowed (expected {getattr(typ, '__name__', typ)})")
        return None
    if isinstance(value, (list, tuple)):
        return parse_value(",".join(str(v) for v in value), typ, name)
    if isinstance(value, dict):
        raise FastByolError(f"config field {name}: expected a value, got a mapping")
    return parse_value(str(value), typ, name)


def apply_config_values(cfg: Config, values: Dict[str, Any]) -> Config:
    """Set ``values`` (from :func:`read_config_file`, without ``preset``) on ``cfg``."""
    types = field_types(cfg)
    for name, raw in values.items():
        set_field(cfg, name, _coerce(raw, types[name], name))
    return cfg


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def write_run_config(cfg: Config, out: str) -> str:
    """Write the resolved ``cfg`` to ``<out>/config.yaml`` (``config.json`` without PyYAML),
    atomically; returns the path. ``fastbyol train --config <that file>`` reruns the run."""
    from .checkpoint import atomic_write_text

    yaml = _yaml()
    tree = _plain(cfg.to_dict())
    if yaml is not None:
        path = os.path.join(out, RUN_CONFIG_NAMES[0])
        body = ("# The resolved config of this run. `fastbyol train --config <this file>` reruns it\n"
                "# (with --out DIR for a new run, or --resume auto to continue this one); flags override it.\n"
                + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None))
    else:
        path = os.path.join(out, RUN_CONFIG_NAMES[1])
        body = json.dumps(tree, indent=2) + "\n"
    atomic_write_text(body, path)
    return path
