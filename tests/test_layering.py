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
