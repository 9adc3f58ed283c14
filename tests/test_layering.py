"""Layering rules of DESIGN.md: models/ is pure torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_MODELS = {"lightning", "pytorch_lightning", "wandb", "fvcore", "datamodules", "lightning_modules"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_every_import_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nimport wandb.sdk as w\nfrom fvcore.nn import FlopCountAnalysis\nfrom . import sibling\n"
                     "def f():\n    import lightning.pytorch\n")
    assert imported_roots(probe) == {"os", "wandb", "fvcore", "lightning"}


@pytest.mark.parametrize("path", sorted((ROOT / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_never_import_training_libraries(path):
    bad = imported_roots(path) & FORBIDDEN_IN_MODELS
    assert not bad, f"models/{path.name} imports {sorted(bad)}: models/ may use only torch and models.*"


PACKAGES = ("models", "datamodules", "lightning_modules", "benchmarks")
#: the stage modules: each builds on lightning_modules' shared parts, never on another stage
STAGES = {"lightning_modules.teacher", "lightning_modules.distill", "lightning_modules.gar"}


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n.split(".")[0] in PACKAGES and (ROOT / (n.replace(".", "/") + ".py")).is_file()}
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a module importing itself, as a script may, left out)."""
    graph = {f"{package}.{path.stem}": project_imports(path)
             for package in PACKAGES for path in sorted((ROOT / package).glob("*.py")) if path.stem != "__init__"}
    return {module: imports - {module} for module, imports in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_project_imports_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\ndef f():\n    from datamodules.avatar import read_dataset\n")
    assert project_imports(probe) == {"datamodules.avatar"}


def test_no_import_cycle_anywhere():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another(stage):
    others = import_graph()[stage] & (STAGES - {stage})
    assert not others, f"{stage} imports {sorted(others)}: share through lightning_modules.stage / handoff instead"
