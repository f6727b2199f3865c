"""Imports point down only: each folder of src/lightning_qlora imports what docs/architecture.md allows."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lightning_qlora"
# Folder -> the folders of ours it may import (itself always), and whether it may import Lightning.
ALLOWED = {
    "core": (set(), False),
    "cpu": ({"core"}, False),
    "io": ({"core"}, False),
    "lightning": ({"core", "cpu", "io"}, True),
    "tasks": ({"core", "io"}, True),
    "app": ({"core", "cpu", "io", "lightning", "tasks"}, True),
    "cli": ({"app", ""}, False),  # "": the package's public names (lightning_qlora.X, loaded lazily)
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_down(folder):
    allowed, may_use_lightning = ALLOWED[folder]
    wrong = []
    for path in sorted((SRC / folder).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in ("lightning", "pytorch_lightning") and not may_use_lightning:
                wrong.append(f"{path.relative_to(SRC)} imports {name}")
            if parts[0] != "lightning_qlora":
                continue
            target = parts[1] if len(parts) > 1 and (SRC / parts[1]).is_dir() else ""
            if target != folder and target not in allowed:
                wrong.append(f"{path.relative_to(SRC)} imports {name}")
            if folder == "lightning" and target == "cpu" and len(parts) > 2:
                wrong.append(f"{path.relative_to(SRC)} reaches into {name}; use lightning_qlora.cpu's entry")
    assert not wrong, wrong
