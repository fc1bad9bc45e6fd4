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


@pytest.mark.slow
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


def module_graph(package: str) -> dict[str, set[str]]:
    """Which modules of ``package`` each of its modules imports (lazy imports inside functions
    included: a circle broken by a deferred import is still a circle of the design). The
    package's ``__init__``, which gathers the public names, is left out."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name == "__init__.py":
            continue
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith(package + "."):
                    edges.add(node.module)
                elif node.module == package:
                    edges.update(f"{package}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith(package + "."))
        graph[name] = edges
    return {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle through each module that lies on one (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles_inside_a_package(package: str) -> None:
    assert cycles(module_graph(package)) == []


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    assert cycles({"p.a": {"p.b"}, "p.b": set()}) == []
