"""Hostile uploads through the HTTP API: each class of bad file gets its 4xx with the JSON
error shape, never a 5xx; decoding memory is bounded across requests; a request past its
deadline starts no more work."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.failures import DeadlineExceededError, NotFoundError
from service.limits import BudgetExhaustedError, MemoryBudget, deadline
from tests.hostile import (
    element_bombs,
    header_bombs,
    jpeg_with_scans,
    jpeg_without_scan,
    long_png,
    png_with_chunks,
    png_with_text,
    rle_bmp,
    rle_row_padding,
    sixteen_bit_png,
    tiff_with_entries,
)
from tests.service.conftest import png, settings_for

EXPECTED = {
    "too_many_pixels": 413,
    "unsupported_aspect_ratio": 422,
    "corrupt_image": 422,
    "too_many_scans": 422,
    "too_much_metadata": 422,
    "too_many_elements": 422,
}


def _search(client: TestClient, data: bytes) -> tuple[int, str]:
    response = client.post("/search", files={"image": ("x", data)}, params={"k": 1})
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json().get("error", {}).get("code", "")


def test_every_class_of_hostile_file_gets_its_4xx(client: TestClient) -> None:
    cases: dict[str, tuple[bytes, str]] = {}
    for fmt, data in header_bombs(60_000, 60_000).items():
        cases[f"{fmt} bomb"] = (data, "too_many_pixels")
    for fmt, data in header_bombs(6_000, 6_000).items():
        cases[f"{fmt} header without its pixels"] = (data, "corrupt_image")
    for fmt, data in header_bombs(300, 9_000).items():
        cases[f"{fmt} 1:30"] = (data, "unsupported_aspect_ratio")
    cases["long PNG"] = (long_png(126, 316_000), "unsupported_aspect_ratio")
    cases["JPEG with no scan data"] = (jpeg_without_scan(6_300, 6_300), "corrupt_image")
    cases["JPEG in 2,000 scans"] = (jpeg_with_scans(4_000, 2_000), "too_many_scans")
    cases["PNG with 64 MB of text"] = (png_with_text(64), "too_much_metadata")
    for name, data in element_bombs(1_000_000).items():
        cases[f"{name}, a million"] = (data, "too_many_elements")
    xmp_of_numbers = tiff_with_entries({700: (3, [1])})
    cases["TIFF whose XMP tag holds numbers"] = (xmp_of_numbers, "corrupt_image")
    empty_icc = png_with_chunks([(b"iCCP", b"")], after_pixels=True)
    cases["PNG with an empty iCCP chunk after its pixels"] = (empty_icc, "corrupt_image")
    cases["RLE8 BMP padded row by row"] = (rle_row_padding(6_000), "too_many_pixels")
    runs = rle_bmp(2_000, 2_000, b"\x01\x07" * 2_500_000)
    cases["RLE8 BMP of 2.5 million one-pixel runs"] = (runs, "too_many_elements")
    for name, (data, code) in cases.items():
        status, answered = _search(client, data)
        assert (status, answered) == (EXPECTED[code], code), name
    assert _search(client, sixteen_bit_png(2_000))[0] == 200


def test_memory_budget_bounds_what_is_held_at_once() -> None:
    budget = MemoryBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def work(size: int) -> None:
        with budget.reserve(size, timeout=10):
            with lock:
                held[0] += min(size, 100)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(size, 100)

    threads = [threading.Thread(target=work, args=(s,)) for s in [40, 70, 30, 250, 60] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < peak[0] <= 100
    assert budget.used == 0
    with (
        budget.reserve(100, timeout=1),
        pytest.raises(BudgetExhaustedError),
        budget.reserve(1, timeout=0.05),
    ):
        pass


def test_a_full_decoding_budget_answers_503_not_out_of_memory(served: dict[str, Path]) -> None:
    app = create_app(settings_for(served, decode_memory_mb=8, request_timeout_s=0.5),
                     load_in_background=False)  # fmt: skip
    with TestClient(app) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        with engine.decoder.budget.reserve(8 * 2**20, timeout=1):  # another decode holds it all
            response = client.post("/search", files={"image": ("q.png", png())})
        assert response.status_code == 503
        assert response.json()["error"]["code"] in ("overloaded", "deadline_exceeded")
        assert client.post("/search", files={"image": ("q.png", png())}).status_code == 200


def test_the_pictures_of_stored_images_are_decoded_within_the_budget(
    served: dict[str, Path], tmp_path: Path
) -> None:
    # GET /explain?format=png decodes both gallery images again to draw them: a reader asking
    # for it many times at once must not hold more than the decoding budget.
    app = create_app(settings_for(served, decode_memory_mb=8, request_timeout_s=0.5),
                     load_in_background=False)  # fmt: skip
    pair = {"a_id": 0, "b_id": 1, "format": "png"}
    with TestClient(app) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        with engine.decoder.budget.reserve(8 * 2**20, timeout=1):  # another decode holds it all
            response = client.get("/explain", params=pair)
        assert response.status_code == 503
        assert response.json()["error"]["code"] in ("overloaded", "deadline_exceeded")
        assert engine.decoder.budget.used == 0
        drawn = client.get("/explain", params=pair)
        assert drawn.status_code == 200
        assert drawn.headers["content-type"] == "image/png"
        _, _, item = engine.stored(0)
        broken = tmp_path / "broken.png"
        broken.write_bytes(png()[:100])
        for path in (str(tmp_path / "gone.png"), str(broken), None):
            with pytest.raises(NotFoundError, match="no longer available"):
                engine.stored_picture(dataclasses.replace(item, path=path))


def test_past_the_deadline_no_decode_or_embed_is_started(client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    submitted: list[object] = []
    original = engine.batcher.submit

    def recording(pixels: object) -> object:
        submitted.append(pixels)
        return original(pixels)

    engine.batcher.submit = recording
    query = engine.decode(png())
    with deadline(-1.0):  # this request is already late
        with pytest.raises(DeadlineExceededError):
            engine.decode(png())
        with pytest.raises(DeadlineExceededError):
            asyncio.run(engine.embed([query]))
    assert submitted == []
    engine.decode(png())  # the deadline ended with its block


def test_the_deadline_503_comes_after_the_dropped_work_has_stopped(
    served: dict[str, Path],
) -> None:
    app = create_app(settings_for(served, request_timeout_s=0.2), load_in_background=False)
    with TestClient(app) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        finished: list[float] = []
        decode = engine.decode

        def slow_decode(data: bytes, name: str = "image") -> object:
            time.sleep(0.6)  # a decode cannot be interrupted half-way
            finished.append(time.monotonic())
            return decode(data, name)

        engine.decode = slow_decode
        submitted: list[object] = []
        submit = engine.batcher.submit
        engine.batcher.submit = lambda pixels: submitted.append(pixels) or submit(pixels)
        response = client.post("/search", files={"image": ("q.png", png())})
        answered = time.monotonic()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert "retry-after" not in response.headers
    assert finished
    assert finished[0] <= answered  # no work of this request runs on after its 503
    assert submitted == []  # and the backbone never saw it
