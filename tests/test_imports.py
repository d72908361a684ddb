"""Import rules of the package: the training core runs without MLflow, Optuna or DVC and never reaches the layers
above it, and no module imports itself back through others (an import cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from _helpers import worker_env

import rrm
from rrm.errors import RRMError
from rrm.models import load_teacher

PACKAGE = Path(rrm.__file__).parent
# The layers above the training core: they may import rrm.train, never the other way round.
ABOVE_TRAIN = ("rrm.tracking", "rrm.tune", "rrm.cli", "rrm.jobs", "rrm.report", "rrm.plots")
# External systems the training core runs without.
SYSTEMS = ("mlflow", "optuna", "dvc")


def _forbidden_in_train(module: str) -> bool:
    return module.split(".")[0] in SYSTEMS or any(module == m or module.startswith(f"{m}.") for m in ABOVE_TRAIN)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _eager_imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: module level and class bodies; not the lazy
    imports inside functions, nor ``if TYPE_CHECKING:`` blocks."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _eager_imports(node.orelse)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _eager_imports(ast.iter_child_nodes(node))


def _imported_modules(name: str) -> set[str]:
    """The rrm modules that importing module ``name`` imports itself."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(module: str) -> None:
        while module and module not in MODULES:  # `from rrm.train import Callback`: the package rrm.train
            module = module.rpartition(".")[0]
        # A submodule importing its own package is no cycle between modules: Python starts a package before any of
        # its submodules (rrm.cli's command modules register on the group its __init__ defined before importing them).
        if module and module != name and not name.startswith(f"{module}."):
            found.add(module)
        # Importing rrm.a.b runs rrm.a first, unless that is a package of this module (already being imported).
        parent = module.rpartition(".")[0]
        while parent and parent != name and not name.startswith(f"{parent}."):
            found.add(parent)
            parent = parent.rpartition(".")[0]

    for node in _eager_imports([ast.parse(path.read_text(), str(path))]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.rsplit(".", node.level - 1)[0]
            base = f"{anchor}.{base}" if base else anchor
        for alias in node.names:  # `from rrm import tracking` imports the module rrm.tracking
            add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH = {name: _imported_modules(name) for name in MODULES}


def test_the_import_graph_sees_the_known_edges():
    """Guards the parser itself: a graph with no edges would pass every rule below."""
    assert "rrm.train.trainer" in GRAPH["rrm.train"]
    assert "rrm.tracking.connection" in GRAPH["rrm.tracking.registry"]
    assert "rrm.train" in GRAPH["rrm.tracking.callback"]


def test_the_package_has_no_import_cycle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(GRAPH[name]):
            if state.get(other) == "open":
                cycle = path[path.index(other) :] + [other]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if other not in state:
                visit(other, [*path, other])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_training_core_never_imports_the_layers_above_it():
    """Not even lazily inside a function: every import in rrm/train counts here."""
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for imported in names:
                assert not _forbidden_in_train(imported), f"{path.name}:{node.lineno} imports {imported}"


def test_importing_the_training_core_loads_neither_mlflow_nor_tracking():
    """Every module of rrm.train imported in a fresh interpreter: no MLflow, Optuna, DVC nor the layers above."""
    core = sorted(name for name in MODULES if name == "rrm.train" or name.startswith("rrm.train."))
    script = (
        f"import importlib, sys\nfor name in {core!r}:\n    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=worker_env())
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "rrm.train.trainer" in loaded
    assert [m for m in loaded if _forbidden_in_train(m)] == []


@pytest.mark.parametrize("uri", ["models:/rrm-teacher@champion", "runs:/0123456789abcdef0123456789abcdef/model"])
def test_the_trainer_refuses_a_registry_uri_with_the_fix(uri):
    with pytest.raises(RRMError, match="must be resolved before training") as caught:
        load_teacher(uri, torch.device("cpu"))
    assert "\n" not in str(caught.value)
