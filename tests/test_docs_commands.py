"""Every command README.md and docs/*.md show is checked here, so none can drift from the code.

Shell blocks (```bash / ```sh) are split into commands. Each ``fastbyol ...`` command (also after
``python -m``, ``torchrun ... -m`` and ``deepspeed ... --module``) is parsed by the real parser and,
for ``train``, resolved and validated as a config (what ``--print-config`` does), without training.
``python -m MODULE ...`` and ``python SCRIPT ...`` run in this process until their argparse has
parsed the arguments (an invalid flag fails the test), and stop there. A few cheap commands run
for real. YAML blocks must load as ``--config`` files. Commands that cannot run here are in
SKIP with the reason.
"""
import argparse
import contextlib
import glob
import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

# Prefix of a command -> why it is not run here.
SKIP = {
    "pip install": "installs packages (CI's .ci/run does the installs)",
    "bash .ci/run": "is CI itself: installs, then runs the whole suite",
    "python -m pytest": "is the test suite this test belongs to",
}
# Run for real: cheap and side-effect free.
RUN = ("python -m fastbyol.config_reference --check",)


def _blocks(path, langs):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    return re.findall(r"^```(?:" + "|".join(langs) + r")[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def doc_commands():
    """(doc, command line) for every command of every shell block."""
    found = []
    for doc in DOCS:
        for block in _blocks(doc, ("bash", "sh", "shell")):
            for line in block.replace("\\\n", " ").splitlines():
                line = " ".join(shlex.split(line, comments=True))  # drops comments, keeps words
                for cmd in (c.strip() for c in line.split("&&")):
                    if cmd:
                        found.append((doc, cmd))
    return found


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _stop_after_parsing():
    """argparse parses as usual, then raises _Parsed instead of letting the program run on."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _check_fastbyol(argv):
    from fastbyol.cli import build_parser, main, resolve_config

    if argv[:1] in (["bench"], ["gpu-check"]):  # their own parsers, behind fastbyol's
        with _stop_after_parsing(), pytest.raises((_Parsed, SystemExit)) as e:
            main(argv)
        assert e.type is _Parsed or e.value.code == 0, f"fastbyol {' '.join(argv)} exited {e.value.code}"
        return
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"fastbyol {' '.join(argv)}: the parser refused it"
        return  # --help
    if ns.command == "train":
        resolve_config(ns)  # preset + file + flags, validated: a FastByolError fails the test


def _run_python(words, parse_only):
    if words[0] == "-m":
        target, args, run = words[1], words[2:], lambda: runpy.run_module(words[1], run_name="__main__",
                                                                          alter_sys=True)
    else:
        target, args = os.path.join(ROOT, words[0]), words[1:]
        assert os.path.exists(target), f"{words[0]} does not exist"
        run = lambda: runpy.run_path(target, run_name="__main__")  # noqa: E731
    saved = sys.argv[:]
    sys.argv = [target] + args
    try:
        with _stop_after_parsing() if parse_only else contextlib.nullcontext():
            run()
    except _Parsed:
        pass
    except SystemExit as e:
        assert e.code in (0, None), f"python {' '.join(words)} exited {e.code}"
    finally:
        sys.argv = saved


def _after(words, flag, module="fastbyol"):
    i = next((i for i in range(len(words) - 1) if words[i] == flag and words[i + 1] == module), None)
    assert i is not None, f"expected `{flag} {module}` in {' '.join(words)}"
    return words[i + 2:]


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20 and any(c == "python -m pytest -q tests" for _, c in COMMANDS)


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    readme_tests = [c for d, c in COMMANDS if d == "README.md" and c.startswith("python -m pytest")]
    assert readme_tests and readme_tests[0] in ci


@pytest.mark.parametrize("doc,cmd", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_doc_command(doc, cmd, monkeypatch, tmp_path):
    from fastbyol.config import preset
    from fastbyol.config_file import write_run_config

    # Commands run in an empty folder holding what the quick start leaves (runs/default/config.yaml),
    # except those that read the checkout.
    monkeypatch.chdir(ROOT if cmd in RUN else tmp_path)
    write_run_config(preset("default"), str(tmp_path / "runs" / "default"))
    reason = next((why for prefix, why in SKIP.items() if cmd.startswith(prefix)), None)
    if reason:
        pytest.skip(f"`{cmd}` {reason}")
    words = shlex.split(cmd)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    prog = words[0]
    if prog == "fastbyol":
        _check_fastbyol(words[1:])
    elif prog in ("python", "python3") and words[1:3] == ["-m", "fastbyol"]:
        _check_fastbyol(words[3:])
    elif prog == "torchrun":
        _check_fastbyol(_after(words, "-m"))
    elif prog == "deepspeed":  # the launcher itself needs GPUs or ssh; what it starts must parse
        _check_fastbyol(_after(words, "--module"))
    elif prog in ("python", "python3"):
        _run_python(words[1:], parse_only=cmd not in RUN)
    else:
        pytest.fail(f"{doc}: no check for `{cmd}`: teach tests/test_docs_commands.py, or add it to SKIP with the reason")


@pytest.mark.parametrize("doc", DOCS)
def test_yaml_blocks_are_valid_config_files(doc, tmp_path):
    from fastbyol.config_file import read_config_file

    for i, block in enumerate(_blocks(doc, ("yaml",))):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block)
        read_config_file(str(path))


def test_configuration_reference_is_current():
    from fastbyol.config_reference import DEFAULT_PATH, render

    with open(os.path.join(ROOT, DEFAULT_PATH), encoding="utf-8") as fh:
        committed = fh.read()
    assert committed == render(), f"{DEFAULT_PATH} is stale: run `python -m fastbyol.config_reference`"


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_compile(doc):
    for block in _blocks(doc, ("python",)):
        compile(block, f"{doc} (python block)", "exec")
