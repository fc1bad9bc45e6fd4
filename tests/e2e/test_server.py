"""The real thing: `diml serve` in its own process on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import live_server
from tests.hostile import (
    corpus,
    encode,
    header_bombs,
    long_png,
    png_with_text,
    sixteen_bit_png,
)
from tests.index_builder.helpers import make_images


def Server(index: Path, checkpoint: Path, **env: str) -> live_server.Server:  # noqa: N802
    """The shared runner, with uploads limited to 200 KB unless ``env`` says otherwise."""
    return live_server.Server(index, checkpoint, **{"DIML_MAX_UPLOAD_BYTES": "200000", **env})


@pytest.fixture
def server(served: dict[str, Path], fresh_index: Path) -> Iterator[Server]:
    s = Server(fresh_index, served["checkpoint"])
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_search_add_delete_and_restart_over_http(
    server: Server, served: dict[str, Path], fresh_index: Path, tmp_path: Path
) -> None:
    image = sorted(served["gallery"].rglob("*.png"))[3]
    response = httpx.post(f"{server.url}/search", files={"image": ("q.png", image.read_bytes())},
                          params={"k": 3}, timeout=60)  # fmt: skip
    assert response.status_code == 200
    hits = response.json()["results"]
    assert hits[0]["key"] == image.relative_to(served["gallery"]).as_posix()
    assert "server" not in response.headers  # no server name or version
    new = make_images(tmp_path / "new", 1, seed=21)[0]
    added = httpx.post(
        f"{server.url}/gallery", files={"images": ("n.png", new.read_bytes())}, timeout=60
    )
    assert added.status_code == 201
    new_id = added.json()["added"][0]["id"]
    assert httpx.delete(f"{server.url}/gallery/0", timeout=60).status_code == 200
    server.stop()
    again = Server(fresh_index, served["checkpoint"])
    try:
        again.wait_ready()
        by_id = httpx.post(f"{again.url}/search/by-id/{new_id}", params={"k": 20}, timeout=60)
        ids = [h["id"] for h in by_id.json()["results"]]
        assert ids[0] == new_id
        assert 0 not in ids
    finally:
        again.stop()


def test_chunked_upload_over_the_limit_gets_413(server: Server) -> None:
    def body() -> Iterator[bytes]:
        yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")  # fmt: skip
        for _ in range(200):
            yield b"\0" * 4096

    response = httpx.post(
        f"{server.url}/search",
        content=body(),
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_ready_reports_the_index(served: dict[str, Path], fresh_index: Path) -> None:
    s = Server(fresh_index, served["checkpoint"])
    try:
        ready = s.wait_ready()
        assert ready.json()["items"] == 12
    finally:
        s.stop()


def _memory_mb(pid: int) -> dict[str, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, from /proc (MB)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc")
def test_concurrent_hostile_uploads_stay_within_the_decoding_budget(
    served: dict[str, Path], fresh_index: Path
) -> None:
    # 28 uploads at once, each under 200 KB and each holding 63-144 MB while it decodes: 16-bit
    # 6000 x 6000 PNGs, 1:19 PNGs inside the pixel limit, BMP/TIFF headers that declare 6000 x
    # 6000 pixels they do not hold (Pillow allocates the image before finding the data short),
    # progressive 4000 x 4000 JPEGs (libjpeg keeps every full-size coefficient, 96 MB, however
    # small the scale it decodes at), 3000 x 3000 WebPs (libwebp and Pillow hold 4 copies) and
    # PNGs whose compressed text inflates to 63 MB while Pillow opens them (under its own limit).
    budget_mb = 160
    s = Server(fresh_index, served["checkpoint"], DIML_DECODE_MEMORY_MB=str(budget_mb),
               DIML_REQUEST_TIMEOUT_S="60")  # fmt: skip
    try:
        s.wait_ready()
        flat = Image.new("RGB", (4_000, 4_000), (90, 140, 60))
        files = [sixteen_bit_png(6_000), long_png(1_400, 26_600)]
        files += [header_bombs(6_000, 6_000)[fmt] for fmt in ("BMP", "TIFF")]
        files += [
            encode(flat, "JPEG", progressive=True, subsampling=0),
            encode(flat.resize((3_000, 3_000)), "WEBP", quality=30, method=0),
            png_with_text(63),
        ]
        warm = httpx.post(f"{s.url}/search", files={"image": ("q", files[0])}, timeout=60)
        assert warm.status_code == 200
        Path(f"/proc/{s.process.pid}/clear_refs").write_text("5")  # restart the peak
        before = _memory_mb(s.process.pid)["VmRSS"]

        def send(data: bytes) -> int:
            response = httpx.post(f"{s.url}/search", files={"image": ("q", data)}, timeout=120)
            return response.status_code

        start = time.monotonic()
        with ThreadPoolExecutor(4 * len(files)) as pool:
            statuses = list(pool.map(send, files * 4))
        took = time.monotonic() - start
        growth = _memory_mb(s.process.pid)["VmHWM"] - before
        assert all(status < 500 or status == 503 for status in statuses), statuses
        assert statuses.count(200) >= 6  # the real images were searched, not all refused
        # The budget counts Pillow's decoded images; the rest (reduced copies, request
        # bodies, torch's scratch for 24 queries) stays well under 150 MB.
        assert growth < budget_mb + 150, f"+{growth:.0f} MB in {took:.1f} s"
    finally:
        s.stop()


def test_a_large_add_does_not_block_searches_or_health(
    served: dict[str, Path], fresh_index: Path
) -> None:
    rng = np.random.default_rng(5)
    uploads = []
    for i in range(150):
        noise = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
        uploads.append(("images", (f"n{i}.jpg", encode(Image.fromarray(noise), "JPEG"))))
    query = sorted(served["gallery"].rglob("*.png"))[2].read_bytes()
    s = Server(fresh_index, served["checkpoint"], DIML_MAX_UPLOAD_BYTES=str(100 * 2**20))
    try:
        s.wait_ready()
        result: dict[str, object] = {}

        def add() -> None:
            start = time.monotonic()
            response = httpx.post(f"{s.url}/gallery", files=uploads, timeout=300)
            result["status"], result["seconds"] = response.status_code, time.monotonic() - start

        adding = threading.Thread(target=add)
        adding.start()
        health, searches, reads = [], [], []
        time.sleep(0.2)  # the add is on its way
        while adding.is_alive():
            for path, times in (("/healthz", health), ("/readyz", health), ("/gallery/1", reads)):
                start = time.monotonic()
                assert httpx.get(f"{s.url}{path}", timeout=30).status_code == 200
                times.append(time.monotonic() - start)
            start = time.monotonic()
            found = httpx.post(f"{s.url}/search", files={"image": ("q.png", query)}, timeout=30)
            assert found.status_code == 200
            searches.append(time.monotonic() - start)
        adding.join()
        assert result["status"] == 201
        seconds = float(result["seconds"])  # type: ignore[arg-type]
        assert len(searches) >= 3, f"{len(searches)} searches during a {seconds:.1f} s add"
        assert max(health) < 1.0, health
        assert max(reads) < 1.0, reads
        assert max(searches) < max(1.0, seconds / 3), (searches, seconds)
        assert httpx.get(f"{s.url}/readyz", timeout=10).json()["items"] == 162
    finally:
        s.stop()


@pytest.mark.parametrize(("point", "count"), [("add:segment-written", 12), ("add:committed", 14)])
def test_kill_9_during_an_http_add_keeps_the_old_or_the_new_gallery(
    served: dict[str, Path], fresh_index: Path, tmp_path: Path, point: str, count: int
) -> None:
    new = make_images(tmp_path / "new", 2, seed=31)
    files = [("images", (p.name, p.read_bytes())) for p in new]
    s = Server(fresh_index, served["checkpoint"], DIML_TEST_CRASH_AT=point)
    try:
        s.wait_ready()
        with pytest.raises(httpx.TransportError):  # the server dies mid-request
            httpx.post(f"{s.url}/gallery", files=files, timeout=60)
        assert s.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        s.stop()
    again = Server(fresh_index, served["checkpoint"])
    try:
        assert again.wait_ready().json()["items"] == count
        uploads = sorted(p.name for p in (fresh_index / "uploads").iterdir())
        kept = [httpx.get(f"{again.url}/gallery/{i}", timeout=10).json()["sha256"]
                for i in range(12, count)]  # fmt: skip
        assert uploads == sorted(kept)  # the killed add's files went with it, or stayed with it
        retried = httpx.post(f"{again.url}/gallery", files=files, timeout=60)
        assert retried.status_code == (201 if count == 12 else 200)
        assert retried.json()["count"] == 14
    finally:
        again.stop()


def test_the_key_is_checked_before_the_body_is_read(
    served: dict[str, Path], fresh_index: Path
) -> None:
    # A client without a key declares a 19 MB upload and sends none of it: the refusal must
    # come from the headers alone, at once, not after waiting for (or reading) the body.
    s = Server(fresh_index, served["checkpoint"], DIML_WRITE_KEYS="w", DIML_READ_KEYS="r",
               DIML_ANONYMOUS_WRITES="off", DIML_MAX_UPLOAD_BYTES=str(20 * 2**20))  # fmt: skip
    try:
        s.wait_ready()
        for method, path, status in (("POST", "/gallery", 401), ("POST", "/search", 401),
                                     ("DELETE", "/gallery/1", 401)):  # fmt: skip
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as conn:
                conn.sendall(
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 19000000\r\n"
                    "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode()
                )
                start = time.monotonic()
                answer = ""
                while not answer.endswith("}}"):  # the headers, then the JSON body
                    answer += conn.recv(4096).decode(errors="replace")
                assert answer.startswith(f"HTTP/1.1 {status}"), answer
                assert time.monotonic() - start < 2
                assert '"unauthorized"' in answer
    finally:
        s.stop()


def _half_sent_upload(port: int) -> socket.socket:
    """A connection that sent its headers and the start of a 1 MB upload, then stalls."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(
        b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
    )
    return conn


def _answers(connections: list[socket.socket], within_s: float) -> list[str]:
    """What the server sent on each connection until it closed it (all within ``within_s``)."""
    start, answers = time.monotonic(), []
    for conn in connections:
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
        answers.append(answer.decode(errors="replace"))
        conn.close()
    assert time.monotonic() - start < within_s
    return answers


def test_slow_clients_are_timed_out_and_connections_are_bounded(
    served: dict[str, Path], fresh_index: Path
) -> None:
    s = Server(fresh_index, served["checkpoint"], DIML_MAX_UPLOAD_BYTES="2000000",
               DIML_BODY_IDLE_TIMEOUT_S="1", DIML_BODY_TIMEOUT_S="3",
               DIML_MAX_CONNECTIONS="20")  # fmt: skip
    query = {"image": ("q.png", sorted(served["gallery"].rglob("*.png"))[1].read_bytes())}
    try:
        s.wait_ready()
        # Under the bound: stalled bodies get 408 after the idle timeout, others are served.
        stalled = [_half_sent_upload(s.port) for _ in range(10)]
        assert httpx.post(f"{s.url}/search", files=query, timeout=10).status_code == 200
        answers = _answers(stalled, within_s=5)
        assert all(a.startswith("HTTP/1.1 408") for a in answers), answers[0][:200]
        assert '"request_timeout"' in answers[0]
        # Over the bound: the requests past it are refused at once (503) and closed.
        answers = _answers([_half_sent_upload(s.port) for _ in range(40)], within_s=5)
        assert sum(a.startswith("HTTP/1.1 503") for a in answers) >= 20
        assert all(a.startswith(("HTTP/1.1 503", "HTTP/1.1 408")) for a in answers)
        assert httpx.post(f"{s.url}/search", files=query, timeout=10).status_code == 200
    finally:
        s.stop()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc")
def test_the_hostile_corpus_against_a_real_server(
    served: dict[str, Path], fresh_index: Path
) -> None:
    files = corpus()
    s = Server(fresh_index, served["checkpoint"], DIML_DECODE_MEMORY_MB="256")
    try:
        s.wait_ready()
        Path(f"/proc/{s.process.pid}/clear_refs").write_text("5")
        before = _memory_mb(s.process.pid)["VmRSS"]
        logged = len(s.output())
        slow, statuses = [], {}
        with httpx.Client(base_url=s.url, timeout=30) as client:
            for name, data in files.items():
                start = time.monotonic()
                response = client.post("/search", files={"image": ("f", data)}, params={"k": 3})
                took = time.monotonic() - start
                statuses[name] = response.status_code
                assert response.status_code < 500, (name, response.text)
                assert response.status_code in (200, 413, 415, 422), (name, response.text)
                assert "error" in response.json() or response.status_code == 200
                if took > 2.0:
                    slow.append(f"{name}: {took:.1f} s")
        growth = _memory_mb(s.process.pid)["VmHWM"] - before
        log = s.output()[logged:]
    finally:
        s.stop()
    assert slow == []
    # An access-log line a request, a warning for each refusal; not a line per broken EXIF tag
    # (one 48 KB file wrote 790 KB before).
    assert len(log) < 200 * len(files), log[-3000:]
    assert growth < 256 + 100, f"+{growth:.0f} MB over {len(files)} files"
    assert statuses["JPEG declaring 60000x60000"] == 413
    assert statuses["DDS header (not accepted)"] == 415
    assert statuses["RGBA WEBP"] == 200
