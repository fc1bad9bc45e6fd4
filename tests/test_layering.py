"""Imports point one way: service -> index_builder -> model; model imports no web or FAISS code."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "index_builder", "service")
# What each package may import from the project itself.
ALLOWED = {
    "model": {"model"},
    "index_builder": {"model", "index_builder"},
    "service": set(PACKAGES),
}
# Third-party code that the pure library must never use.
MODEL_FORBIDDEN = {
    "fastapi", "starlette", "uvicorn", "httpx", "requests", "pydantic", "pydantic_settings",
    "faiss", "sqlite3", "flask", "aiohttp",
}  # fmt: skip


def imported_roots(source: str) -> set[str]:
    """Top-level module names that ``source`` imports (absolute imports only)."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def violations(package: str, source: str) -> set[str]:
    roots = imported_roots(source)
    wrong = {r for r in roots & set(PACKAGES) if r not in ALLOWED[package]}
    if package == "model":
        wrong |= roots & MODEL_FORBIDDEN
    return wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    problems = {
        str(path.relative_to(REPO)): sorted(bad)
        for path in sorted((REPO / package).rglob("*.py"))
        if (bad := violations(package, path.read_text()))
    }
    assert problems == {}, f"imports against service -> index_builder -> model: {problems}"


def test_the_checker_catches_a_wrong_arrow() -> None:
    assert violations("model", "from service.cli import main") == {"service"}
    assert violations("model", "import index_builder.store as s") == {"index_builder"}
    assert violations("model", "import faiss\nfrom fastapi import FastAPI") == {"faiss", "fastapi"}
    assert violations("index_builder", "from service import app") == {"service"}
    assert violations("service", "from index_builder import x\nfrom model import y") == set()
    assert violations("model", "def f():\n    import service.app\n") == {"service"}


def test_model_imports_without_web_or_faiss_modules() -> None:
    import subprocess

    code = (
        "import sys, model; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(MODEL_FORBIDDEN)!r}); "
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
