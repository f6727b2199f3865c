"""Rules for the suite itself: no test can hang on a child process."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# subprocess functions that wait for the child, and the Popen methods that do.
WAITING = {"run", "call", "check_call", "check_output"}
POPEN_WAITS = {"wait", "communicate"}


def _calls_without_timeout(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func, keywords = node.func, {k.arg for k in node.keywords}
        on_subprocess = isinstance(func.value, ast.Name) and func.value.id == "subprocess" and func.attr in WAITING
        # proc.wait(60) / proc.communicate(input, 60) pass it by position.
        positional = {"wait": 1, "communicate": 2}.get(func.attr, 99)
        waits = func.attr in POPEN_WAITS and len(node.args) < positional
        if (on_subprocess or waits) and "timeout" not in keywords and "**" not in ast.unparse(node):
            found.append(f"{path.relative_to(TESTS.parent)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_subprocess_call_in_tests_has_a_timeout():
    # pytest-timeout (pyproject.toml) stops a hung test; a timeout= on each call also ends its child.
    missing = [line for path in sorted(TESTS.rglob("*.py")) for line in _calls_without_timeout(path)]
    assert missing == [], "\n".join(missing)
