"""The package's layering, checked from the imports: no module imports one above its layer, and
no two modules import each other, directly or round a loop (imports inside functions count too:
they run, only later).

Every ``import`` of ``fastbyol`` and ``fastbyol_kernels`` (the ``kernels/`` folder) is read with
``ast``, without importing anything, so the test is fast and needs no optional package.
"""
from __future__ import annotations

import ast
import functools
import os
from typing import Dict, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fastbyol": os.path.join(ROOT, "fastbyol"), "fastbyol_kernels": os.path.join(ROOT, "kernels")}

# Lowest first. A module may import its own layer and those below it, never one above. A name
# stands for that module or package and everything under it, the longest matching name wins;
# "fastbyol" alone is the package's own __init__ only. A module in no layer fails the test.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("kernels", ("fastbyol_kernels",)),
    ("foundations", ("fastbyol.errors", "fastbyol.config", "fastbyol.runtime", "fastbyol.schedules",
                     "fastbyol.counter_rng", "fastbyol.host_sync", "fastbyol.finite", "fastbyol.stop",
                     "fastbyol.monitor", "fastbyol._checkout")),
    ("building blocks", ("fastbyol.checkpoint", "fastbyol.resume", "fastbyol.sync_batchnorm",
                         "fastbyol.distributed", "fastbyol.augment", "fastbyol.batch_views",
                         "fastbyol.backbones", "fastbyol.model", "fastbyol.optim", "fastbyol.data",
                         "fastbyol.engines", "fastbyol.batchnorm_ops", "fastbyol.config_file")),
    ("package facade", ("fastbyol",)),  # fastbyol/__init__.py re-exports config, errors and the model
    ("eval", ("fastbyol.eval",)),
    ("trainer", ("fastbyol.parts", "fastbyol.trainer")),
    ("launch", ("fastbyol.launch",)),
    ("drop-in APIs", ("fastbyol.compat",)),
    ("benchmarks and the cost model", ("fastbyol.bench", "fastbyol.cost")),  # they drive the trainer
    ("command line", ("fastbyol.cli", "fastbyol.__main__", "fastbyol.config_reference")),  # dispatches to all of the above, bench included
]

# Upward imports inside a function, each with the reason it cannot go down. Keep this tiny.
ALLOWED_UPWARD: Dict[Tuple[str, str], str] = {}


def module_files() -> Dict[str, str]:
    """{module name: file} for every .py file of both packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, folder)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for f in filenames:
                if f.endswith(".py"):
                    name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                    found[name] = os.path.join(dirpath, f)
    return found


def imports_of(name: str, path: str, modules: Set[str]) -> Set[str]:
    """The package modules ``name`` imports, anywhere in the file. ``from pkg import x`` is an
    import of ``pkg.x`` when that is a module, else of ``pkg``."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()

    def known(target: str):
        while target and target not in modules:  # ``import a.b.c`` where c is a name in a.b
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [known(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base) for a in node.names]
        else:
            continue
        found.update(t for t in targets if t and t != name)
    return found


@functools.lru_cache(maxsize=None)
def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer_of(module: str) -> int:
    matches = [(len(p), rank) for rank, (_, prefixes) in enumerate(LAYERS) for p in prefixes
               if module == p or (module.startswith(p + ".") and p != "fastbyol")]
    if not matches:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it to the table")
    return max(matches)[1]


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checks_see_a_cycle_and_resolve_relative_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    f = tmp_path / "m.py"
    f.write_text("from . import sib\nfrom ..up import thing\nimport p.deep.name\n"
                 "def later():\n    from .sib import x\n")
    modules = {"p", "p.q", "p.q.m", "p.q.sib", "p.up", "p.deep"}
    assert imports_of("p.q.m", str(f), modules) == {"p.q.sib", "p.up", "p.deep"}


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_one_above_its_layer():
    upward = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module) and (module, target) not in ALLOWED_UPWARD:
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_allowed_upward_imports_are_still_there():
    graph = import_graph()
    stale = [pair for pair in ALLOWED_UPWARD if pair[1] not in graph.get(pair[0], ())]
    assert not stale, f"ALLOWED_UPWARD lists imports that are gone: {stale}"
