"""What the docs promise about the suite holds: each reliability case names a test pytest collects."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _collected(path: Path) -> set[str]:
    """The test functions pytest collects from ``path``: module-level ``test_*`` and ``Test*`` methods."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test")}
    return names


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case ")]


def test_every_reliability_case_names_a_collected_test():
    text = (ROOT / "docs" / "reliability.md").read_text()
    rows = _table_rows(text)
    assert len(rows) >= 30, "the case table is missing or was cut"
    missing = []
    for row in rows:
        ids = TEST_ID.findall(row.rsplit("|", 2)[-2])  # the last column
        assert ids, f"a case with no test: {row[:80]}"
        for file, name in ids:
            path = ROOT / file
            # pytest collects test_*.py files under testpaths (pyproject.toml) only.
            if not (path.name.startswith("test_") and path.is_file() and name in _collected(path)):
                missing.append(f"{file}::{name}")
    assert missing == [], f"docs/reliability.md names tests that pytest does not collect: {missing}"


def test_the_readme_links_the_case_table():
    assert "(docs/reliability.md)" in (ROOT / "README.md").read_text()
