"""``fastbyol`` command line: ``train``, ``export``, ``bench``, ``gpu-check``.

Errors a user can fix (bad config, missing data, non-finite loss, unwritable output) print
one line, ``fastbyol: error: ...``, and exit with status 2; no traceback. A run stopped by
SIGTERM / Ctrl-C exits 143 / 130 after its checkpoint (README, "Checkpoints and preemption").
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

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
        self.exit(2, f"fastbyol: error: {message} (see 'fastbyol {self.prog.split()[-1]} --help')\n")


def _metavar(typ) -> str:
    """INT, FLOAT, STR, BOOL, or A,B for tuples; Optional[X] as X."""
    from typing import get_args, get_origin

    args = [a for a in get_args(typ) if a is not type(None)]
    if get_origin(typ) is tuple:
        return ",".join(_metavar(a) for a in args)
    if args:
        return _metavar(args[0])
    return getattr(typ, "__name__", str(typ)).upper()


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    reference = preset("imagenet-resnet50")
    docs = field_docs()
    inverse = {v: k for k, v in ALIASES.items()}
    groups = {}
    for name, typ, default in iter_fields(reference):
        if name == "preset":
            continue
        section = name.split(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} config")
        flags = [f"--{name}"] + ([inverse[name]] if name in inverse else [])
        groups[section].add_argument(*flags, dest=name, metavar=_metavar(typ), default=argparse.SUPPRESS,
                                     help=f"{docs.get(name, '')} (imagenet-resnet50: {default})".lstrip().replace('%', '%%'))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastbyol", description="Fast, paper-exact BYOL pretraining.")
    # The deepspeed launcher puts --local_rank=N before the subcommand (`deepspeed --module fastbyol train ...`).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    tr = sub.add_parser("train", help="pretrain an encoder with BYOL",
                        usage="fastbyol train [--preset NAME] [--data DIR] [--val-data DIR] [--section.field VALUE ...]",
                        description="Pretrain with BYOL. Without --data, trains on the embedded synthetic "
                                    "texture set (written once to ~/.cache/fastbyol). Every config field can be "
                                    "set as --section.field VALUE.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="named config (default: 'default' without --data, 'cifar10-resnet18' for CIFAR "
                         "batches, 'imagenet-resnet50' for an image folder)")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    tr.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_config_arguments(tr)
    ex = sub.add_parser("export", help="write the online encoder of a checkpoint as a plain state_dict")
    ex.add_argument("checkpoint", help="checkpoint file or run folder")
    ex.add_argument("output", help="output .pt file")
    be = sub.add_parser("bench", help="throughput benchmark (benchmarks/bench_train.py)", add_help=False)
    be.add_argument("args", nargs=argparse.REMAINDER)
    gc = sub.add_parser("gpu-check", help="measure everything on the first GPU (benchmarks/gpucheck; --tiny on CPU)",
                        add_help=False)
    gc.add_argument("args", nargs=argparse.REMAINDER)
    return p


def auto_preset(data: Optional[str]) -> str:
    if data is None:
        return "default"
    from .data.sources import is_cifar_dir

    return "cifar10-resnet18" if os.path.isdir(data) and is_cifar_dir(data) else "imagenet-resnet50"


def resolve_config(ns: argparse.Namespace) -> Config:
    overrides = {k: v for k, v in vars(ns).items() if "." in k}
    cfg = preset(ns.preset or auto_preset(overrides.get("data.data")))
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
    from .checkpoint import export_encoder

    sd = export_encoder(ns.checkpoint, ns.output)
    print(f"wrote {len(sd)} tensors of the online encoder to {ns.output}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(here, "benchmarks"))
    try:
        import bench_train
    except ImportError:
        raise FastByolError("benchmarks/bench_train.py not found: run from a source checkout of fastbyol") from None
    bench_train.main(ns.args)
    return 0


def cmd_gpu_check(ns: argparse.Namespace) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(here, "benchmarks"))
    try:
        import gpucheck
    except ImportError as e:
        if "gpucheck" not in str(e):
            raise
        raise FastByolError("benchmarks/gpucheck not found: run from a source checkout of fastbyol "
                            "(python -m fastbyol gpu-check works there without installing)") from None
    return gpucheck.main(ns.args)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:  # argparse's REMAINDER drops a leading option (`bench --smoke`)
            return cmd_bench(argparse.Namespace(args=argv[1:]))
        if argv[:1] == ["gpu-check"]:
            return cmd_gpu_check(argparse.Namespace(args=argv[1:]))
        ns = build_parser().parse_args(argv)
        return {"train": cmd_train, "export": cmd_export, "bench": cmd_bench, "gpu-check": cmd_gpu_check}[ns.command](ns)
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
