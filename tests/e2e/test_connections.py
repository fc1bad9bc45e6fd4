"""The server that ``diml serve`` runs (:mod:`service.server`), over real sockets: past the
connection limit a JSON 503 with ``Retry-After``, never a reset; early answers read before the
connection closes; request heads with a deadline, kept-alive connections with their own."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.server import ServerConfig
from service.settings import Settings
from tests.live_server import Server, free_port


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def _slow(request: Request) -> JSONResponse:
    """Reads the body, then takes half a second: its requests stay in progress together."""
    size = len(await request.body())
    await asyncio.sleep(0.5)
    return JSONResponse({"bytes": size})


async def _refuse(request: Request) -> JSONResponse:
    """Answers without reading the body, as a refusal on the headers alone does."""
    return JSONResponse({"error": {"code": "unauthorized"}}, 401, {"Connection": "close"})


APP = Starlette(routes=[Route("/", _ok), Route("/slow", _slow, methods=["POST"]),
                        Route("/refuse", _refuse, methods=["POST"])])  # fmt: skip


@pytest.fixture
def port() -> Iterator[int]:
    """:data:`APP` served as ``diml serve`` serves: 4 connections, heads within 1 s, kept-alive
    connections closed after 2 idle seconds."""
    settings = Settings(max_connections=4, header_timeout_s=1, keep_alive_s=2)
    config = ServerConfig(APP, settings, host="127.0.0.1", port=free_port(), log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield config.port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _post(port: int, path: str, size: int, ready: threading.Barrier | None = None) -> str:
    """POST ``size`` bytes and read the answer to the end: the answer, or 'reset'."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        if ready is not None:
            ready.wait()  # every connection is open before any request is sent
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                "Connection: close\r\n\r\n").encode()  # fmt: skip
        try:
            conn.sendall(head + b"\0" * size)
            return _read_all(conn).decode(errors="replace")
        except (ConnectionResetError, BrokenPipeError):
            return "reset"


def _read_all(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


def _read_response(conn: socket.socket) -> bytes:
    """One response (with a Content-Length) from a connection that stays open."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += conn.recv(65536)
    head, body = answer.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def _status(answer: str) -> str:
    return answer.split(" ", 2)[1] if answer.startswith("HTTP/1.1 ") else answer[:40]


def _json_body(answer: str) -> dict[str, dict[str, str]]:
    body: dict[str, dict[str, str]] = json.loads(answer.split("\r\n\r\n", 1)[1])
    return body


def test_past_the_connection_limit_a_json_503_with_retry_after_not_a_reset(port: int) -> None:
    # 20 connections open at once on a server that serves 4, each then sending 256 KB: the first
    # 4 are served; the others are told 503 (not reset while their upload is still coming in).
    ready = threading.Barrier(20)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: _post(port, "/slow", 2**18, ready), range(20)))
    assert Counter(_status(a) for a in answers) == {"200": 4, "503": 16}
    refused = [a for a in answers if _status(a) == "503"]
    for answer in refused:
        head = answer.split("\r\n\r\n", 1)[0].lower()
        assert "retry-after: 1" in head
        assert "content-type: application/json" in head
        assert _json_body(answer)["error"]["code"] == "overloaded"
    # The places come back once the connections close.
    assert _status(_post(port, "/slow", 10)) == "200"


def test_an_answer_before_the_body_is_read_reaches_the_client(port: int) -> None:
    # The app refuses on the headers alone; the client is still sending 4 MB. Closing then
    # would reset the connection under the client; the rest of the body is read first.
    answer = _post(port, "/refuse", 4 * 2**20)
    assert _status(answer) == "401", answer[:200]
    assert _status(_post(port, "/refuse", 10)) == "401"


def _wait_for_close(conn: socket.socket) -> tuple[bytes, float]:
    start = time.monotonic()
    return _read_all(conn), time.monotonic() - start


def test_request_heads_have_a_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HT")
        answer, waited = _wait_for_close(conn)
    assert 0.8 < waited < 3
    assert _status(answer.decode()) == "408"
    assert _json_body(answer.decode())["error"]["code"] == "request_timeout"
    # A connection that sends nothing is closed at the same deadline, without an answer.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        answer, waited = _wait_for_close(conn)
    assert (answer, 0.8 < waited < 3) == (b"", True)


def test_a_head_sent_a_byte_at_a_time_does_not_extend_its_deadline(port: int) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        start = time.monotonic()
        for byte in head[:-1]:  # a byte every 0.3 s: the whole head would take 8 s
            conn.sendall(bytes([byte]))
            if select.select([conn], [], [], 0.3)[0]:
                break  # the server answered
        answer = _read_all(conn)
        waited = time.monotonic() - start
    assert _status(answer.decode()) == "408"
    assert waited < 2


def test_kept_alive_connections_close_after_keep_alive_s(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for _ in range(2):  # kept alive: a second request on the same connection
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
        rest, waited = _wait_for_close(conn)
    assert rest == b""  # closed quietly, after the keep-alive time (2 s), not the head's (1 s)
    assert 1.7 < waited < 4


def test_diml_serve_runs_this_server(served: dict[str, Path], fresh_index: Path) -> None:
    image = sorted(served["gallery"].rglob("*.png"))[1].read_bytes()
    body = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b--\r\n")  # fmt: skip
    head = (f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nConnection: close\r\n\r\n"
            ).encode()  # fmt: skip
    s = Server(fresh_index, served["checkpoint"], DIML_MAX_CONNECTIONS="4",
               DIML_HEADER_TIMEOUT_S="1")  # fmt: skip
    ready = threading.Barrier(20)

    def search(_: int) -> str:
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
            ready.wait()
            try:
                conn.sendall(head + body)
                return _read_all(conn).decode(errors="replace")
            except (ConnectionResetError, BrokenPipeError):
                return "reset"

    try:
        s.wait_ready()
        with ThreadPoolExecutor(20) as pool:
            statuses = Counter(_status(a) for a in pool.map(search, range(20)))
        assert set(statuses) <= {"200", "503"}, statuses
        assert statuses["200"] >= 4
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as conn:
            conn.sendall(b"POST /search HTTP/1.1\r\nHost")
            answer, waited = _wait_for_close(conn)
        assert _status(answer.decode()) == "408"
        assert waited < 3
    finally:
        s.stop()
