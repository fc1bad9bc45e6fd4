"""Shared fixtures (real CUB photos when ../shared/data/cub-dev is present, skips otherwise) and
the two test lanes.

``pytest`` runs the fast lane (about 90 s on 2 cores): it leaves out the tests that start a
server, a browser or Docker (tests/e2e), read the CUB photos, or are marked slow (training,
subprocesses, measurements).
``pytest --full`` runs everything; CI and the README use it.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Exported ONNX graphs go to a folder of this test run (servers started by tests inherit it).
os.environ.setdefault("DIML_CACHE", tempfile.mkdtemp(prefix="diml-cache-"))
CUB_DEV = Path(os.environ.get("DIML_CUB_DEV", REPO.parent / "shared" / "data" / "cub-dev"))


@pytest.fixture(scope="session")
def cub_dev() -> Path:
    """The real CUB-200-2011 development subset; tests that need it skip when it is absent."""
    if not (CUB_DEV / "images.txt").is_file():
        pytest.skip(
            f"needs the CUB-200-2011 development subset at {CUB_DEV} (set DIML_CUB_DEV to its "
            "folder); it is research-only data and never part of the repository"
        )
    return CUB_DEV


@pytest.fixture(scope="session")
def cub_images(cub_dev: Path) -> list[Path]:
    """Paths of the first few images, in images.txt order (same-class pairs come first)."""
    lines = (cub_dev / "images.txt").read_text().split("\n")
    return [cub_dev / "images" / line.split()[1] for line in lines[:6] if line.strip()]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="run every test: servers, browsers, Docker, the CUB photos, training (CI does)",
    )


def _slow(item: pytest.Item) -> bool:
    """Out of the fast lane: marked slow, end to end, or reading the CUB photos."""
    return (
        "slow" in item.keywords
        or Path(str(item.path)).is_relative_to(REPO / "tests" / "e2e")
        or "cub_dev" in getattr(item, "fixturenames", ())
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--full"):
        slow = [_slow(item) for item in items]
        if any(slow):
            config.hook.pytest_deselected(items=list(itertools.compress(items, slow)))
            items[:] = [item for item, out in zip(items, slow, strict=True) if not out]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    if config.getoption("--full"):
        return "lane: full (every test)"
    return "lane: fast (no servers, browsers, Docker, CUB photos or slow tests; --full runs all)"
