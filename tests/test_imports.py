"""The layers of the package, as a table, checked over every import: module level and inside functions.

A module may import its own layer and the layers its row names, nothing above; no import, eager or lazy, closes a
loop between modules; no module reads another's private (underscore) names; no module is over 400 lines. The table
is the one ``docs/architecture.md`` draws. Imports under ``if TYPE_CHECKING:`` never run and are not counted.
"""

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
MAX_LINES = 400

# layer: (the modules it holds, by name or package prefix; the layers below it that it may import)
GROUND = (
    "rrm",
    "rrm.errors",
    "rrm.config",
    "rrm.io",
    "rrm.secrets",
    "rrm.stats",
    "rrm.params",
    "rrm.plots",
    "rrm.progress",
)
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ground": (GROUND, ()),
    "data": (("rrm.data",), ("ground",)),
    "models": (("rrm.models",), ("ground",)),
    "attacks": (("rrm.attacks",), ("ground",)),
    "metrics": (("rrm.metrics",), ("ground", "data")),
    "train": (("rrm.train", "rrm.robustify"), ("ground", "data", "models", "attacks", "metrics")),
    "evaluation": (("rrm.evaluation",), ("ground", "data", "models", "attacks", "metrics")),
    "report": (("rrm.report",), ("ground", "train", "evaluation")),
    "tracking": (("rrm.tracking",), ("ground", "data", "models", "train", "evaluation")),
    "tune": (("rrm.tune",), ("ground", "data", "models", "attacks", "metrics", "train", "evaluation", "tracking")),
    "jobs": (
        ("rrm.jobs",),
        ("ground", "data", "models", "attacks", "metrics", "train", "evaluation", "report", "tracking", "tune"),
    ),
    "cli": (
        ("rrm.cli", "rrm.console"),
        ("ground", "data", "models", "attacks", "metrics", "train", "evaluation", "report", "tracking", "tune", "jobs"),
    ),
}
# External systems each is imported by one layer alone.
SYSTEMS = {"mlflow": ("tracking",), "optuna": ("tune",), "dvc": ()}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level, class bodies and function bodies alike; not the blocks
    under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(node.orelse)
        else:
            yield from _imports(ast.iter_child_nodes(node))


class Package:
    """The modules of the package at ``root`` and what each imports, as names (``rrm.x.y``)."""

    def __init__(self, root: Path):
        self.root = root
        self.modules = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
        self.trees = {name: ast.parse(path.read_text(), str(path)) for name, path in self.modules.items()}
        self.graph = {name: self._edges(name) for name in self.modules}

    def statements(self, name: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, list[str]]]:
        """Each import of module ``name`` with the absolute names it reads (``a.b`` and ``a.b.name``)."""
        package = name if self.modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports([self.trees[name]]):
            if isinstance(node, ast.Import):
                yield node, [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            yield node, [base] + [f"{base}.{alias.name}" for alias in node.names]

    def _edges(self, name: str) -> set[str]:
        found: set[str] = set()
        for _, names in self.statements(name):
            for imported in names:
                module = imported
                while module and module not in self.modules:  # `from rrm.train import Callback`: rrm.train
                    module = module.rpartition(".")[0]
                # A submodule importing its own package closes no loop: Python starts a package before any of its
                # submodules (rrm.cli's command modules register on the group its __init__ defined first).
                if module and module != name and not name.startswith(f"{module}."):
                    found.add(module)
        return found

    def cycle(self) -> list[str] | None:
        """One import loop between modules, or None."""
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> list[str] | None:
            state[name] = "open"
            for other in sorted(self.graph[name]):
                if state.get(other) == "open":
                    return path[path.index(other) :] + [other]
                if other not in state and (found := visit(other, [*path, other])):
                    return found
            state[name] = "done"
            return None

        for name in sorted(self.graph):
            if name not in state and (found := visit(name, [name])):
                return found
        return None


def layer_of(module: str) -> str | None:
    best = None
    for layer, (members, _) in LAYERS.items():
        for member in members:
            inside = module == member or (member not in GROUND and module.startswith(f"{member}."))
            if inside and (best is None or len(member) > len(best[1])):
                best = (layer, member)
    return best[0] if best else None


RRM = Package(PACKAGE)


def test_the_import_graph_sees_module_level_and_function_level_edges():
    """Guards the parser itself: a graph with no edges would pass every rule below."""
    assert "rrm.train.trainer" in RRM.graph["rrm.train"]
    assert "rrm.tracking.connection" in RRM.graph["rrm.tracking.registry"]
    assert "rrm.train" in RRM.graph["rrm.tracking.callback"]
    assert "rrm.tracking" in RRM.graph["rrm.jobs.common"]  # imported inside tracking()


def test_every_module_has_a_layer():
    assert [name for name in RRM.modules if layer_of(name) is None] == []


def test_every_import_goes_down_the_layers():
    wrong = []
    for name in RRM.modules:
        layer = layer_of(name)
        allowed = {layer, *LAYERS[layer][1]} if layer else set()
        for other in RRM.graph[name]:
            if layer_of(other) not in allowed:
                wrong.append(f"{name} ({layer}) imports {other} ({layer_of(other)})")
    assert wrong == []


def test_each_external_system_is_imported_by_its_own_layer_alone():
    wrong = []
    for name in RRM.modules:
        for node, names in RRM.statements(name):
            system = names[0].split(".")[0]
            if system in SYSTEMS and layer_of(name) not in SYSTEMS[system]:
                wrong.append(f"{name}:{node.lineno} imports {names[0]}")
    assert wrong == []


def test_the_package_has_no_import_loop():
    assert RRM.cycle() is None, " -> ".join(RRM.cycle())


def test_a_loop_through_a_function_level_import_is_found(tmp_path):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg import b\n")
    (root / "b.py").write_text("def f():\n    from pkg.a import g\n    return g\n")
    (root / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    found = Package(root)
    assert found.cycle() == ["pkg.a", "pkg.b", "pkg.a"]
    assert found.graph["pkg.c"] == set()


def test_no_module_reads_another_modules_private_names():
    wrong = []
    for name in RRM.modules:
        for node, _ in RRM.statements(name):
            if isinstance(node, ast.ImportFrom) and ((node.module or "").startswith("rrm") or node.level):
                wrong += [
                    f"{name}:{node.lineno} imports {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert wrong == []


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in RRM.modules.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_importing_the_training_core_loads_neither_mlflow_nor_tracking():
    """Every module of rrm.train imported in a fresh interpreter: no MLflow, Optuna, DVC nor the layers above."""
    core = sorted(name for name in RRM.modules if layer_of(name) == "train")
    script = (
        f"import importlib, sys\nfor name in {core!r}:\n    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=worker_env())
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "rrm.train.trainer" in loaded
    above = {"report", "tracking", "tune", "jobs", "cli", "evaluation"}
    assert [m for m in loaded if m.split(".")[0] in SYSTEMS or layer_of(m) in above] == []


@pytest.mark.parametrize("uri", ["models:/rrm-teacher@champion", "runs:/0123456789abcdef0123456789abcdef/model"])
def test_the_trainer_refuses_a_registry_uri_with_the_fix(uri):
    with pytest.raises(RRMError, match="must be resolved before training") as caught:
        load_teacher(uri, torch.device("cpu"))
    assert "\n" not in str(caught.value)


# What evaluation and the attacks build on: they run without the trainer, tracking, tuning, the jobs and the CLI.
EVALUATION_BUILDS_ON = (
    "errors",
    "config",
    "io",
    "progress",
    "stats",
    "data",
    "models",
    "metrics",
    "attacks",
    "evaluation",
)


@pytest.mark.parametrize("package", ["evaluation", "attacks"])
def test_evaluation_and_attacks_import_only_the_layers_below(package):
    """Not even lazily inside a function: every import in rrm/evaluation and rrm/attacks counts here."""
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for imported in names:
                top, _, rest = imported.partition(".")
                assert top not in SYSTEMS, f"{path.name}:{node.lineno} imports {imported}"
                if top == "rrm" and rest:
                    assert rest.split(".")[0] in EVALUATION_BUILDS_ON, f"{path.name}:{node.lineno} imports {imported}"
