"""Structural rules of trainer/ that a reader relies on: the backends are a seam no caller looks behind (no
code outside trainer/backends.py compares distribution names), and no function is longer than a reader can
hold in mind."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO_ROOT
from trainer.backends import DISTRIBUTIONS

TRAINER = REPO_ROOT / "trainer"
SOURCES = sorted(TRAINER.rglob("*.py"))
MAX_FUNCTION_LINES = 80


def _names_a_backend(node: ast.AST) -> bool:
    """A distribution name as a string, or the ``.name`` of something called backend."""
    if isinstance(node, ast.Constant) and node.value in DISTRIBUTIONS:
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_backend(e) for e in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "name" and "backend" in ast.unparse(node.value).lower()


def backend_name_comparisons(source: str) -> list[str]:
    """Comparisons (==, !=, in, not in) with a distribution name or a backend's name, as source lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_names_a_backend(n) for n in [node.left, *node.comparators]):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_detector_finds_name_comparisons():
    code = ('if backend.name == "horovod": pass\n'
            'x = self.backend.name != "mirrored"\n'
            'y = name in ("one_device", "mirrored")\n'
            'z = run.backend.is_chief and not backend.writes_checkpoints\n')
    assert len(backend_name_comparisons(code)) == 3


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "backends.py"],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_backend_name_comparisons_outside_backends(path):
    assert backend_name_comparisons(path.read_text()) == [], \
        f"{path.relative_to(REPO_ROOT)}: ask the backend (a property or method), not its name"


def function_lengths(source: str) -> dict[str, int]:
    """Lines of every function and method, not counting its docstring."""
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            docstring = first.end_lineno - first.lineno + 1 if isinstance(first, ast.Expr) and isinstance(
                getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str) else 0
            lengths[f"{node.name} (line {node.lineno})"] = node.end_lineno - node.lineno + 1 - docstring
    return lengths


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_function_longer_than_a_reader_can_hold(path):
    long = {name: n for name, n in function_lengths(path.read_text()).items() if n > MAX_FUNCTION_LINES}
    assert not long, f"{path.relative_to(REPO_ROOT)}: {long}"
