from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model import Embedding
from service.app import create_app
from service.batching import MicroBatcher
from service.failures import OverloadedError
from service.metrics import STAGES
from tests.hostile import dds_header, png_header
from tests.index_builder.helpers import make_images
from tests.service.conftest import png, settings_for


def _client(served: dict[str, Path], index: Path | None = None, **extra: object) -> TestClient:
    return TestClient(create_app(settings_for(served, index, **extra), load_in_background=False))


@pytest.mark.parametrize(
    ("device_search", "device_grids"),
    [(False, False), (True, False), (True, True)],
    ids=["faiss", "torch-exact", "torch-exact-grids-on-device"],
)
def test_add_search_delete_and_restart(
    served: dict[str, Path],
    fresh_index: Path,
    tmp_path: Path,
    device_search: bool,
    device_grids: bool,
) -> None:
    new = make_images(tmp_path / "new", 2, seed=11)
    ways = {"device_search": device_search, "device_grids": device_grids}
    with _client(served, fresh_index, **ways) as client:
        files = [("images", (p.name, p.read_bytes())) for p in new]
        files.append(("images", ("dup.png", new[0].read_bytes())))
        # All or nothing: one upload that is not an image refuses the request, naming it.
        refused = client.post("/gallery", files=[*files, ("images", ("notes.txt", b"hello"))])
        assert refused.status_code == 415
        assert refused.json()["error"]["message"].startswith("notes.txt: not a readable image")
        assert client.get("/gallery").json()["total"] == 12
        assert not list((fresh_index / "uploads").glob("*"))  # no file left behind
        added = client.post("/gallery", files=files, data={"label": "new"})
        assert added.status_code == 201, added.text
        body = added.json()
        assert [a["id"] for a in body["added"]] == [12, 13]
        assert body["added"][0]["label"] == "new"
        assert body["count"] == 14
        assert body["skipped"] == [
            {"filename": "dup.png", "reason": f"duplicate bytes of {new[0].name}"}
        ]
        again = client.post("/gallery", files=files[:1])  # nothing new: 200, not 201
        assert again.status_code == 200
        assert again.json()["added"] == []
        assert again.json()["skipped"][0]["reason"].startswith("duplicate bytes")
        query = {"image": ("q.png", new[1].read_bytes())}
        assert client.post("/search", files=query, params={"k": 1}).json()["results"][0]["id"] == 13
        assert client.get("/gallery/13/image").content == new[1].read_bytes()
        assert client.delete("/gallery/13").json() == {"removed": 1, "count": 13}
        assert client.delete("/gallery/13").status_code == 404
        hits = client.post("/search", files=query, params={"k": 20}).json()["results"]
        assert 13 not in [h["id"] for h in hits]
    with _client(served, fresh_index, **ways) as client:  # a restart
        assert client.get("/gallery", params={"limit": 500}).json()["total"] == 13
        hits = client.post("/search", files=query, params={"k": 20}).json()["results"]
        assert 13 not in [h["id"] for h in hits]
        assert 12 in [h["id"] for h in hits]
        assert client.get("/gallery/12").json()["label"] == "new"


def test_gallery_pages(client: TestClient) -> None:
    page = client.get("/gallery", params={"offset": 10, "limit": 5}).json()
    assert page["total"] == 12
    assert [i["id"] for i in page["items"]] == [10, 11]
    assert client.get("/gallery/3").json()["id"] == 3
    image = client.get("/gallery/3/image")
    assert image.headers["content-type"] == "image/png"
    assert client.get("/gallery/77/image").status_code == 404


def test_a_read_only_server_refuses_changes(served: dict[str, Path]) -> None:
    with _client(served, read_keys=["r"], write_keys=["w"]) as client:  # allowed, not writable
        response = client.delete("/gallery/1", headers={"x-api-key": "w"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "read_only"


def _big_png(side: int) -> bytes:
    return png(Image.new("L", (side, side)))


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"plain text", 415, "unsupported_media_type"),
        (png(fmt="PPM"), 415, "unsupported_media_type"),
        (png(fmt="JPEG")[:300], 422, "corrupt_image"),
        (b"", 422, "empty_upload"),
        (_big_png(3000), 413, "too_many_pixels"),
        # A header past Pillow's own bomb limit (Image.open refuses it): was a 500.
        (png_header(40_000, 40_000), 413, "too_many_pixels"),
        # A format Pillow knows but the service does not accept: its decoder is never run.
        (dds_header(), 415, "unsupported_media_type"),
    ],
)
def test_bad_images_get_the_right_status(
    served: dict[str, Path], content: bytes, status: int, code: str
) -> None:
    with _client(served, max_pixels=4_000_000) as client:
        response = client.post("/search", files={"image": ("upload.bin", content)})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert str(served["root"]) not in error["message"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    "params",
    [{"k": 0}, {"k": "ten"}, {"rerank_k": -1}, {"matches": 999}, {"explain": "perhaps"}],
)
def test_bad_parameters_are_422(client: TestClient, params: dict[str, object]) -> None:
    response = client.post("/search", files={"image": ("q.png", png())}, params=params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_missing_image_field_and_unknown_routes(client: TestClient) -> None:
    assert client.post("/search").status_code == 422
    missing = client.get("/nowhere")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert client.get("/search").status_code == 405


def test_declared_body_over_the_limit_is_refused_before_reading(served: dict[str, Path]) -> None:
    with _client(served, max_upload_bytes=10_000) as client:
        response = client.post("/search", files={"image": ("big.png", b"\0" * 20_000)})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_chunked_body_over_the_limit_is_stopped_while_streaming(served: dict[str, Path]) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield (
            b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        for _ in range(100):
            sent += 4096
            yield b"\0" * 4096

    with _client(served, max_upload_bytes=10_000) as client:
        response = client.post(
            "/search",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_readiness_before_and_after_loading(served: dict[str, Path], tmp_path: Path) -> None:
    app = create_app(settings_for(served))
    client = TestClient(app)  # no lifespan yet: nothing loaded
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    response = client.post("/search", files={"image": ("q.png", png())})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    with TestClient(create_app(settings_for(served), load_in_background=False)) as loaded:
        ready = loaded.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["items"] == 12
    broken = settings_for(served, tmp_path / "absent")
    with TestClient(create_app(broken, load_in_background=False)) as failed:
        response = failed.get("/readyz")
        assert response.status_code == 503
        assert str(tmp_path) not in response.text


def test_api_key_scopes(served: dict[str, Path], fresh_index: Path) -> None:
    with _client(served, fresh_index, read_keys=["r-key"], write_keys=["w-key"]) as client:
        image = {"image": ("q.png", png())}
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.post("/search", files=image).status_code == 401
        assert client.post("/search", files=image, headers={"x-api-key": "nope"}).status_code == 403
        read = {"authorization": "Bearer r-key"}
        write = {"x-api-key": "w-key"}
        assert client.post("/search", files=image, headers=read).status_code == 200
        assert client.post("/search", files=image, headers=write).status_code == 200
        assert client.delete("/gallery/1", headers=read).status_code == 403
        assert client.delete("/gallery/1").status_code == 401
        assert client.delete("/gallery/1", headers=write).status_code == 200
        # A credential of another scheme is refused, not passed over for the valid X-API-Key.
        basic = {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "r-key"}
        refused = client.post("/search", files=image, headers=basic)
        assert refused.status_code == 401
        assert "Bearer" in refused.json()["error"]["message"]


def test_writes_are_refused_when_only_read_keys_exist(
    served: dict[str, Path], fresh_index: Path
) -> None:
    with _client(served, fresh_index, read_keys=["r"], anonymous_writes="off") as client:
        response = client.delete("/gallery/1", headers={"x-api-key": "r"})
    assert response.status_code == 403


def test_gallery_changes_need_a_write_key_by_default(
    served: dict[str, Path], fresh_index: Path
) -> None:
    from service.settings import Settings

    assert Settings().anonymous_writes == "off"
    with _client(served, fresh_index, anonymous_writes="off") as client:
        deleted = client.delete("/gallery/1")
        added = client.post("/gallery", files={"images": ("a.png", png())})
        assert client.post("/search", files={"image": ("q.png", png())}).status_code == 200
        assert client.get("/gallery").json()["total"] == 12
    for response in (deleted, added):
        assert response.status_code == 403
        assert "DIML_WRITE_KEYS" in response.json()["error"]["message"]
    # Loopback-only anonymous writes: the test client is not a loopback address.
    with _client(served, fresh_index, anonymous_writes="loopback") as client:
        assert client.delete("/gallery/1").status_code == 403
    # (tests/e2e/test_server.py adds and deletes from 127.0.0.1 with DIML_ANONYMOUS_WRITES=loopback)


def test_metrics_can_require_the_read_key(served: dict[str, Path]) -> None:
    with _client(served, read_keys=["r"], protect_metrics=True) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"x-api-key": "r"}).status_code == 200
        assert client.get("/healthz").status_code == 200
    with _client(served, read_keys=["r"]) as client:
        assert client.get("/metrics").status_code == 200


def test_metrics_count_requests_and_stages(client: TestClient) -> None:
    client.post("/search", files={"image": ("q.png", png())})
    text = client.get("/metrics").text
    assert 'diml_requests_total{method="POST",route="/search",status="200"}' in text
    for stage in STAGES:
        assert f'diml_stage_seconds_count{{stage="{stage}"}}' in text


def test_invented_http_methods_share_one_metrics_label(client: TestClient) -> None:
    for i in range(20):
        client.request(f"FOO{i}", "/healthz")
    text = client.get("/metrics").text
    assert "FOO" not in text
    assert 'method="other"' in text
    series = [line for line in text.splitlines() if line.startswith("diml_requests_total{")]
    assert len([line for line in series if 'method="other"' in line]) <= 2  # e.g. 405, 404


def test_a_request_past_its_deadline_gets_503(served: dict[str, Path]) -> None:
    with _client(served, request_timeout_s=1e-4) as client:
        searched = client.post("/search", files={"image": ("q.png", png())})
        explained = client.post("/explain", files={"a": ("a.png", png())}, data={"b_id": "1"})
        later = client.post("/search/by-id/1")
    for response in (searched, explained, later):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "deadline_exceeded"


def test_a_full_queue_answers_503_with_retry_after(client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]

    def full(pixels: object) -> None:
        raise OverloadedError()

    original = engine.batcher.submit
    engine.batcher.submit = full
    try:
        response = client.post("/search", files={"image": ("q.png", png())})
    finally:
        engine.batcher.submit = original
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "overloaded"


class _Backbone:
    """A stand-in embedder that records batch sizes and can be held back."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.sizes: list[int] = []

    def embed_pixels(self, pixels: torch.Tensor, keep_maps: bool = False) -> Embedding:
        self.release.wait(5)
        self.sizes.append(len(pixels))
        return Embedding(torch.zeros(len(pixels), 4, 2), torch.zeros(len(pixels), 2))


def test_micro_batcher_embeds_concurrent_requests_together() -> None:
    backbone = _Backbone()
    backbone.release.set()
    batcher = MicroBatcher(backbone, max_batch=8, window_s=0.5, max_queue=8)  # type: ignore[arg-type]
    futures = [batcher.submit(torch.zeros(n, 3, 8, 8)) for n in (1, 2, 2)]
    assert [len(f.result(5)) for f in futures] == [1, 2, 2]
    assert backbone.sizes == [5]  # three requests, one pass through the backbone
    batcher.close()


def test_micro_batcher_waits_for_company_only_while_some_is_decoding() -> None:
    # One client used to wait out the whole window before every embedding, for nobody.
    backbone = _Backbone()
    backbone.release.set()
    decoding = [0]
    batcher = MicroBatcher(backbone, max_batch=8, window_s=2.0, max_queue=8,  # type: ignore[arg-type]
                           expect=lambda: decoding[0])  # fmt: skip
    start = time.perf_counter()
    assert len(batcher.submit(torch.zeros(1, 3, 8, 8)).result(5)) == 1
    assert time.perf_counter() - start < 1.0  # not the 2 s window
    decoding[0] = 1  # another request is decoding: the next job waits for it
    first = batcher.submit(torch.zeros(1, 3, 8, 8))
    time.sleep(0.2)
    second = batcher.submit(torch.zeros(2, 3, 8, 8))
    assert [len(first.result(5)), len(second.result(5))] == [1, 2]
    assert backbone.sizes == [1, 3]
    batcher.close()


def _busy_batcher(max_queue: int) -> tuple[_Backbone, MicroBatcher, Any]:
    """A batcher whose worker has taken a first one-image job and waits on the backbone."""
    backbone = _Backbone()
    batcher = MicroBatcher(backbone, max_batch=1, window_s=0.0, max_queue=max_queue)  # type: ignore[arg-type]
    first = batcher.submit(torch.zeros(1, 3, 8, 8))
    deadline = time.monotonic() + 5
    while batcher.jobs.qsize() and time.monotonic() < deadline:  # the worker takes it, then waits
        time.sleep(0.01)
    return backbone, batcher, first


def test_micro_batcher_bounds_its_queue() -> None:
    backbone, batcher, first = _busy_batcher(max_queue=2)
    waiting = [batcher.submit(torch.zeros(1, 3, 8, 8)) for _ in range(2)]
    with pytest.raises(OverloadedError):
        batcher.submit(torch.zeros(1, 3, 8, 8))
    backbone.release.set()
    assert [len(f.result(5)) for f in [first, *waiting]] == [1, 1, 1]
    batcher.close()


def test_a_cancelled_request_does_not_stop_the_batcher() -> None:
    # A request past its deadline cancels its future; the batcher must skip it and keep serving.
    backbone, batcher, first = _busy_batcher(max_queue=4)
    abandoned = batcher.submit(torch.zeros(2, 3, 8, 8))
    assert abandoned.cancel()
    backbone.release.set()
    assert len(first.result(5)) == 1
    later = batcher.submit(torch.zeros(3, 3, 8, 8))
    assert len(later.result(5)) == 3
    assert backbone.sizes == [1, 3]  # the cancelled request never reached the backbone
    batcher.close()


def test_first_start_indexes_the_gallery_then_reuses_the_index(
    served: dict[str, Path], tmp_path: Path
) -> None:
    index = tmp_path / "new.index"
    with _client(served, index, gallery=served["gallery"]) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["items"] == 12
    version = (index / "CURRENT").read_text()
    with _client(served, index, gallery=served["gallery"]) as client:  # a later start
        assert client.get("/readyz").json()["items"] == 12
    assert (index / "CURRENT").read_text() == version  # not built again
