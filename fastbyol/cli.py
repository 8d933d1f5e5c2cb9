"""``fastbyol`` command line: ``train``, ``export``, ``eval linear|knn``, ``bench``, ``gpu-check``, ``cost``.

Errors a user can fix (bad config, missing data, non-finite loss, unwritable output) print
one line, ``fastbyol: error: ...``, and exit with status 2; no traceback. A run stopped by
SIGTERM / Ctrl-C exits 143 / 130 after its checkpoint (README, "Checkpoints and preemption").
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Dict, List, Optional

from .config import PRESETS, Config, apply_overrides, field_docs, iter_fields, preset
from .errors import FastByolError, TrainingStopped

# Short spellings for the fields people set most.
ALIASES = {
    "--data": "data.data", "--val-data": "data.val_data", "--loader": "data.loader", "--workers": "data.workers",
    "--epochs": "train.epochs", "--max-steps": "train.max_steps", "--batch-size": "train.batch_size",
    "--precision": "train.precision", "--out": "train.out", "--resume": "train.resume", "--seed": "train.seed",
    "--device": "train.device", "--lr": "optim.base_lr", "--optimizer": "optim.optimizer",
    "--backbone": "model.backbone", "--deepspeed": "dist.deepspeed", "--zero-stage": "dist.zero_stage",
    "--grad-accum": "dist.grad_accum", "--ds-config": "dist.ds_config", "--kernels": "train.kernels",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str):
        # prog is the whole command ("fastbyol", "fastbyol train", "fastbyol eval linear").
        self.exit(2, f"fastbyol: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        # Left-over arguments surface at the top parser: name the subcommand they were given to.
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            words = [self.prog] + [w for w in (getattr(ns, "command", None), getattr(ns, "eval_command", None)) if w]
            self.exit(2, f"fastbyol: error: unrecognized arguments: {' '.join(extras)} (see '{' '.join(words)} --help')\n")
        return ns


def _metavar(typ) -> str:
    """INT, FLOAT, STR, BOOL, or A,B for tuples; Optional[X] as X."""
    from typing import get_args, get_origin

    args = [a for a in get_args(typ) if a is not type(None)]
    if get_origin(typ) is tuple:
        return ",".join(_metavar(a) for a in args)
    if args:
        return _metavar(args[0])
    return getattr(typ, "__name__", str(typ)).upper()


def _shown(value) -> str:
    """A default as it is typed on the command line (tuples as A,B)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@functools.lru_cache(maxsize=None)
def _preset_values() -> Dict[str, Dict[str, str]]:
    """``{preset: {field: value as typed}}``, built once (the parser asks for every field)."""
    return {p: {n: _shown(v) for n, _, v in iter_fields(preset(p))} for p in PRESETS}


def preset_defaults(name: str) -> str:
    """``(default: 64; cifar10-resnet18: 256, imagenet-resnet50: 4096, smoke: 16)``: the
    ``default`` preset's value of field ``name``, then the presets where it differs."""
    values = {p: fields[name] for p, fields in _preset_values().items()}
    others = [f"{p}: {v}" for p, v in sorted(values.items()) if p != "default" and v != values["default"]]
    return f"(default: {values['default']}{'; ' + ', '.join(others) if others else ''})"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    docs = field_docs()
    inverse = {v: k for k, v in ALIASES.items()}
    groups = {}
    for name, typ, _ in iter_fields(preset("default")):
        if name == "preset":
            continue
        section = name.split(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} config")
        flags = [f"--{name}"] + ([inverse[name]] if name in inverse else [])
        groups[section].add_argument(*flags, dest=name, metavar=_metavar(typ), default=argparse.SUPPRESS,
                                     help=f"{docs.get(name, '')} {preset_defaults(name)}".lstrip().replace('%', '%%'))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastbyol", description="Fast, paper-exact BYOL pretraining.")
    # The deepspeed launcher puts --local_rank=N before the subcommand (`deepspeed --module fastbyol train ...`).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    tr = sub.add_parser("train", help="pretrain an encoder with BYOL",
                        usage="fastbyol train [--preset NAME] [--config FILE] [--data DIR] [--val-data DIR] [--section.field VALUE ...]",
                        description="Pretrain with BYOL. Without --data, trains on the embedded synthetic "
                                    "texture set (written once to ~/.cache/fastbyol). Every config field can be "
                                    "set as --section.field VALUE. Defaults depend on the preset: each field "
                                    "shows the 'default' preset's value, then the presets where it differs.")
    tr.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="named config (without it: 'default' without --data, 'cifar10-resnet18' for CIFAR "
                         "batches, 'imagenet-resnet50' for an image folder, even of small images: pass "
                         "--preset default or cifar10-resnet18 for those)")
    tr.add_argument("--config", metavar="FILE", default=None,
                    help="YAML or JSON config, nested by section as a run's config.yaml (preset < file < flags)")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    tr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_config_arguments(tr)
    ex = sub.add_parser("export", help="write the online encoder of a checkpoint as a plain state_dict",
                        description="Write the online encoder as a plain state_dict (tensors only: it loads "
                                    "with load_state_dict), and beside it OUTPUT.json, the training record "
                                    "(image size, normalisation, preset, backbone, kNN k) that fastbyol eval uses.")
    ex.add_argument("checkpoint", help="checkpoint file or run folder")
    ex.add_argument("output", help="output .pt file")
    add_eval_parsers(sub)
    be = sub.add_parser("bench", help="training throughput against lightly and byol-pytorch (fastbyol.bench.train)", add_help=False)
    be.add_argument("args", nargs=argparse.REMAINDER)
    gc = sub.add_parser("gpu-check", help="measure everything on the first GPU (fastbyol.bench.gpucheck; --tiny on CPU)",
                        add_help=False)
    gc.add_argument("args", nargs=argparse.REMAINDER)
    co = sub.add_parser("cost", help="model one training step's GPU cost per stage, without a GPU (fastbyol/cost)",
                        usage="fastbyol cost [--preset NAME] [--batch-size N] [--precision P] [--world-size N] "
                              "[--save DIR] [--json] [--section.field VALUE ...]",
                        description="Run the training step on meta tensors, count every op's launches, bytes and "
                                    "FLOPs, and print per-stage roofline times for H100 and H200.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    co.add_argument("--preset", choices=sorted(PRESETS), default="imagenet-resnet50", help="named config")
    co.add_argument("--world-size", type=int, default=1, help="GPUs the global batch is split over (>1: "
                                                              "SyncFreeBatchNorm and gradient all-reduces counted)")
    co.add_argument("--save", metavar="DIR", default=None, help="also write cost_<preset>_b<batch>_<precision>"
                                                                ".json/.md/.png there")
    co.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    co.add_argument("--top", type=int, default=15, help="costliest ops listed")
    add_config_arguments(co)
    return p


def _csv(typ):
    def parse(text: str):
        try:
            return [typ(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {typ.__name__}s, got {text!r}") from None
    return parse


class _NoneHidingDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (those options' help says where their value comes from)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_eval_parsers(sub) -> None:
    """``fastbyol eval linear|knn`` (fastbyol/eval/)."""
    ev = sub.add_parser("eval", help="evaluate a frozen encoder: linear probe or weighted kNN",
                        description="Evaluate the encoder of a fastbyol checkpoint, a run folder, an exported "
                                    "encoder, a torchvision state_dict, or --random-init.")
    evsub = ev.add_subparsers(dest="eval_command", metavar="{linear,knn}", required=True, parser_class=OneLineParser)
    fmt = _NoneHidingDefaultsFormatter
    li = evsub.add_parser("linear", help="the paper's linear protocol (or --mode features)", formatter_class=fmt,
                          description="Linear evaluation: a linear layer on the frozen encoder's pooled features. "
                                      "Presets: imagenet (the paper's), cifar (solo-learn's), default (embedded set); "
                                      "unset flags come from the preset.")
    kn = evsub.add_parser("knn", help="weighted kNN of the training monitor (its k and T)", formatter_class=fmt,
                          description="Weighted kNN (cosine similarity, exp(sim/T) votes) on centre views, "
                                      "with the training monitor's k and T unless given.")
    for p in (li, kn):
        p.add_argument("checkpoint", nargs="?", default=None,
                       help="fastbyol checkpoint or run folder, exported encoder, or torchvision state_dict "
                            "(omit with --random-init and --backbone)")
        p.add_argument("--random-init", action="store_true",
                       help="random weights of the checkpoint's (or --backbone's) architecture: the reference row")
        p.add_argument("--backbone", default=None, help="expected encoder (default: the checkpoint's)")
        p.add_argument("--cifar-stem", action="store_true", help="with --random-init and no checkpoint: CIFAR stem")
        p.add_argument("--data", default=None, help="labelled training images (default: the checkpoint's, "
                                                     "else the embedded set)")
        p.add_argument("--val-data", default=None, help="labelled test images (default: held out as in training)")
        p.add_argument("--image-size", type=int, default=None,
                       help="evaluation crop (default: the checkpoint's or export's training size; required for "
                            "a state_dict without fastbyol export's record)")
        p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
        p.add_argument("--eval-batch", type=int, default=256, help="batch of the feature extraction")
        p.add_argument("--device", default="auto", help="auto / cpu / cuda")
        p.add_argument("--seed", type=int, default=None, help="random-init weights, data order, crops")
        p.add_argument("--out", default=None, help="folder of the JSON (and PNG) results "
                                                    "(default: <run folder>/eval, else runs/eval)")
        p.add_argument("--timeout-minutes", type=float, default=30.0, help="process-group timeout (several ranks)")
    li.add_argument("--preset", choices=["imagenet", "cifar", "default"], default=None,
                    help="default: from the checkpoint's or export's training preset (required for a "
                         "state_dict without fastbyol export's record); random init: from --data")
    li.add_argument("--mode", choices=["full", "features"], default=None,
                    help="full: the paper's protocol; features: precomputed centre-view features (fast)")
    li.add_argument("--epochs", type=int, default=None)
    li.add_argument("--batch-size", type=int, default=None, help="global batch (halved while > 1/8 of train)")
    li.add_argument("--lr", type=_csv(float), default=None, help="lr or comma-separated grid")
    li.add_argument("--schedule", choices=["cosine", "step"], default=None)
    li.add_argument("--holdout", type=float, default=None, help="held out to pick the lr: images, or a fraction < 1")
    li.add_argument("--standardize", type=lambda v: v.lower() in ("1", "true", "yes", "on"), default=None,
                    metavar="BOOL", help="standardise features by train mean/std first (preset default: on, others off)")
    li.add_argument("--crop-scale", type=_csv(float), default=None, help="training crop area range MIN,MAX")
    kn.add_argument("--k", type=_csv(int), default=None,
                    help="neighbours, comma-separated: one result per k (default: the training monitor's "
                         "train.knn_k for the checkpoint's preset: "
                         f"{', '.join(f'{n} {preset(n).train.knn_k}' for n in sorted(PRESETS))})")
    kn.add_argument("--t", type=float, default=None,
                    help="temperature (default: the training monitor's train.knn_t for the checkpoint's preset: "
                         f"{', '.join(f'{n} {preset(n).train.knn_t}' for n in sorted(PRESETS))})")
    kn.add_argument("--max-bank", type=int, default=None, help="cap on the bank (random subset); default: all")


def cmd_eval(ns: argparse.Namespace) -> int:
    from .eval.run import run_knn, run_linear

    if ns.eval_command == "knn" and ((ns.k is not None and (not ns.k or min(ns.k) < 1)) or
                                     (ns.t is not None and ns.t <= 0)):
        raise FastByolError("--k must be >= 1 and --t > 0")
    if ns.eval_command == "linear" and ns.crop_scale is not None and len(ns.crop_scale) != 2:
        raise FastByolError("--crop-scale takes MIN,MAX")
    (run_linear if ns.eval_command == "linear" else run_knn)(ns)
    return 0


def auto_preset(data: Optional[str]) -> str:
    if data is None:
        return "default"
    from .data.sources import is_cifar_dir

    return "cifar10-resnet18" if os.path.isdir(data) and is_cifar_dir(data) else "imagenet-resnet50"


def preset_summary(cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    return (f"{m.backbone}{' (CIFAR stem)' if m.cifar_stem else ''} at {cfg.augment.image_size} px, "
            f"global batch {t.batch_size}, {t.epochs} epochs")


def auto_preset_note(name: str, data: Optional[str]) -> str:
    """The log line that says which preset ``--data`` chose, and how to choose another."""
    why = {"default": "no --data: the embedded synthetic set", "cifar10-resnet18": f"CIFAR batches in --data {data}",
           "imagenet-resnet50": f"--data {data} is an image folder"}[name]
    note = f"preset {name} ({why}): {preset_summary(preset(name))}"
    if name == "imagenet-resnet50":
        note += ("; for small images or a small data set pass --preset default "
                 f"({preset_summary(preset('default'))}) or --preset cifar10-resnet18")
    return note


def resolve_config(ns: argparse.Namespace) -> Config:
    """The preset, then ``--config FILE``, then the flags, each overriding the one before."""
    from .config_file import apply_config_values, read_config_file

    overrides = {k: v for k, v in vars(ns).items() if "." in k}
    from_file = read_config_file(ns.config) if getattr(ns, "config", None) else {}
    file_preset = from_file.pop("preset", None)
    data = overrides.get("data.data", from_file.get("data.data"))
    name = ns.preset or file_preset or auto_preset(data)
    if ns.preset is None and file_preset is None and os.environ.get("RANK", "0") == "0":
        logging.getLogger("fastbyol").info(auto_preset_note(name, data))
    cfg = preset(name)
    apply_config_values(cfg, from_file)
    return apply_overrides(cfg, overrides).validate()


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = resolve_config(ns)
    if ns.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .launch import run_training

    summary = run_training(cfg)
    if summary is not None:
        print(json.dumps({k: v for k, v in summary.items()}, indent=None, default=str))
        if summary.get("knn_top1") is not None and summary.get("knn_top1_random_init") is not None:
            print(f"kNN top-1: trained encoder {summary['knn_top1']:.2f}% vs random-init encoder "
                  f"{summary['knn_top1_random_init']:.2f}%")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .checkpoint import export_encoder, export_record_path, read_export_record

    sd = export_encoder(ns.checkpoint, ns.output)
    print(f"wrote {len(sd)} tensors of the online encoder to {ns.output}")
    record = read_export_record(ns.output)
    if record is not None:
        print(f"wrote its training record to {export_record_path(ns.output)} (preset {record['preset']}, "
              f"{record['image_size']} px, kNN k {record['knn_k']}): fastbyol eval reads it")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from .bench.train import main as bench_main

    bench_main(ns.args)
    return 0


def cmd_gpu_check(ns: argparse.Namespace) -> int:
    from .bench.gpucheck import main as gpu_check_main

    return gpu_check_main(ns.args)


def cmd_cost(ns: argparse.Namespace) -> int:
    from .cost import report, step_cost

    summary = report.summarize(step_cost(resolve_config(ns), ns.world_size))
    print(json.dumps(summary, indent=1) if ns.json else report.table(summary, ns.top))
    if ns.save:
        for path in report.write(summary, ns.save):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:  # argparse's REMAINDER drops a leading option (`bench --smoke`)
            return cmd_bench(argparse.Namespace(args=argv[1:]))
        if argv[:1] == ["gpu-check"]:
            return cmd_gpu_check(argparse.Namespace(args=argv[1:]))
        ns = build_parser().parse_args(argv)
        return {"train": cmd_train, "export": cmd_export, "eval": cmd_eval, "bench": cmd_bench,
                "gpu-check": cmd_gpu_check, "cost": cmd_cost}[ns.command](ns)
    except FastByolError as e:
        print(f"fastbyol: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a signal, after the checkpoint: 143 (SIGTERM) or 130 (SIGINT)
        print(f"fastbyol: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fastbyol: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
