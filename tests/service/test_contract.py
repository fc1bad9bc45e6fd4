"""The HTTP contract as the OpenAPI schema states it: what each response holds, which
methods and numbers are accepted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import png, settings_for

REPO = Path(__file__).resolve().parents[2]


def test_a_hit_always_carries_its_label_even_when_null(
    served: dict[str, Path], fresh_index: Path, tmp_path: Path
) -> None:
    app = create_app(settings_for(served, fresh_index), load_in_background=False)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]["Hit"]
        assert "label" in schema["required"]
        added = client.post("/gallery", files={"images": ("u.png", png())})  # no label
        assert added.json()["added"][0]["label"] is None
        hits = client.post("/search", files={"image": ("q.png", png())}, params={"k": 13}).json()
        no_explanations = client.post(
            "/search", files={"image": ("q.png", png())}, params={"explain": False}
        ).json()["results"]
    assert all("label" in hit for hit in hits["results"])
    assert None in [hit["label"] for hit in hits["results"]]
    assert all("explanation" not in hit for hit in no_explanations)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/gallery/1", "DELETE, GET, HEAD, OPTIONS"),
        ("PATCH", "/gallery", "GET, HEAD, OPTIONS, POST"),
        ("DELETE", "/search", "OPTIONS, POST"),
        ("POST", "/healthz", "GET, HEAD, OPTIONS"),
    ],
)
def test_405_lists_every_allowed_method(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_head_on_health_endpoints(client: TestClient) -> None:
    for path in ("/healthz", "/readyz"):
        response = client.head(path)
        assert response.status_code == 200
        assert response.content == b""


@pytest.mark.parametrize("written", ["1_0", "+5", " 1", "1.0", "1e1", "0x1", "١"])
def test_numbers_are_written_with_digits_only(client: TestClient, written: str) -> None:
    assert client.get(f"/gallery/{written}").status_code == 404  # only digits match an id
    assert client.get("/gallery", params={"limit": written}).status_code == 422
    search = client.post("/search", files={"image": ("q.png", png())}, params={"k": written})
    assert search.status_code == 422
    explained = client.post("/explain", files={"a": ("a.png", png())}, data={"b_id": written})
    assert explained.status_code == 422
    assert client.get("/gallery/10").status_code == 200


def test_one_part_per_single_image_field(client: TestClient) -> None:
    two = [("image", ("a.png", png())), ("image", ("b.png", png()))]
    response = client.post("/search", files=two)
    assert response.status_code == 422
    assert "one 'image' part" in response.json()["error"]["message"]
    both = client.post(
        "/explain", files=[("a", ("a.png", png())), ("a", ("b.png", png()))], data={"b_id": "1"}
    )
    assert both.status_code == 422


@pytest.mark.slow
def test_serve_without_an_index_says_how_to_start_and_leaves_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "gallery.index"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--index", str(missing)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "diml index build" in done.stderr
    assert "docker/entrypoint.sh" in done.stderr
    assert not missing.exists()
