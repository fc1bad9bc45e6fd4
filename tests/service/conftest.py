"""A small real index and a tiny checkpoint shared by the service tests."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model import save_checkpoint
from service.app import create_app
from service.settings import Settings
from tests.index_builder.helpers import build_tiny, make_images, tiny_embedder


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A gallery of 12 synthetic pictures indexed with a tiny checkpoint."""
    root = tmp_path_factory.mktemp("served")
    embedder = tiny_embedder()
    checkpoint = root / "tiny.safetensors"
    save_checkpoint(embedder.model, checkpoint)
    gallery = root / "gallery"
    make_images(gallery, 12)
    build_tiny(gallery, root / "index")
    return {"root": root, "checkpoint": checkpoint, "gallery": gallery, "index": root / "index"}


@pytest.fixture
def fresh_index(served: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the index, for tests that change it."""
    copy = tmp_path / "index"
    shutil.copytree(served["index"], copy)
    return copy


def settings_for(served: dict[str, Path], index: Path | None = None, **extra: object) -> Settings:
    """Settings for a test app: writable (and open to anonymous writes) when given an index."""
    values: dict[str, object] = {
        "index": index or served["index"],
        "checkpoint": served["checkpoint"],
        "allow_writes": index is not None,
        "anonymous_writes": "any" if index is not None and not extra.get("write_keys") else "off",
    }
    return Settings(**{**values, **extra})  # type: ignore[arg-type]


@pytest.fixture
def client(served: dict[str, Path]) -> Iterator[TestClient]:
    app = create_app(settings_for(served), load_in_background=False)
    with TestClient(app) as c:
        yield c


def png(image: Image.Image | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    (image or Image.new("RGB", (80, 60), (200, 30, 30))).save(buffer, fmt)
    return buffer.getvalue()


def assert_whole_score(e: dict[str, object], exact: bool = True, tol: float = 1e-5) -> None:
    """An explanation's contributions add up: each term's lists to the term, the totals to the
    score (less the reported residual), both sides; with ``exact`` the residuals are rounding."""
    c: dict[str, dict[str, object]] = e["contributions"]  # type: ignore[assignment]
    terms = {"global": e["global_similarity"], "structural": e["structural_similarity"],
             "total": e["score"]}  # fmt: skip
    assert c["exact"] is exact
    for side in ("query", "result"):
        residual = c["residual"][side]  # type: ignore[index]
        for term, value in terms.items():
            values = c[term][side]  # type: ignore[index]
            if values is None:
                assert not exact
                assert term == "global"
                continue
            expected = value - residual if term == "total" else value  # type: ignore[operator]
            assert sum(values) == pytest.approx(expected, abs=tol), (term, side)
        if exact:
            assert abs(residual) < tol
