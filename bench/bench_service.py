"""Latency and throughput of POST /search over loopback, stage by stage.

    .venv/bin/python bench/bench_service.py --cub ../shared/data/cub-dev [--inference onnx]

Indexes the CUB photos with the default model (or serves ``--index``), starts ``diml serve`` on
127.0.0.1, and sends /search requests (k=10, rerank_k=100, explain on) with 1, 4 and 16
concurrent clients. Prints client-side p50/p95 latency and requests/second per concurrency, and
the server's median time per stage from the ``Server-Timing`` header (decode, embed, coarse
search, re-rank, explain). By default the server runs twice over the same index, with the
backbone in ONNX Runtime and then in PyTorch, and both are printed side by side. Every loop is
bounded by ``--requests``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from model.runtime import RUNTIMES
from service.metrics import STAGES

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(cub: Path, out: Path, inference: str) -> None:
    command = [sys.executable, "-m", "service.cli", "index", "build", "--images",
               str(cub / "images"), "--out", str(out), "--quiet",
               "--inference", inference]  # fmt: skip
    subprocess.run(command, check=True, cwd=REPO)


def serve(
    index: Path,
    port: int,
    inference: str,
    settings: dict[str, str] | None = None,
    log: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """``diml serve`` of ``index``, read-only, with ``settings`` (DIML_* variables) on top;
    its output goes to ``log`` (or nowhere)."""
    command = [sys.executable, "-m", "service.cli", "serve", "--index", str(index),
               "--port", str(port)]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "DIML_ALLOW_WRITES": "false",
           "DIML_INFERENCE": inference, **(settings or {})}  # fmt: skip
    out = log if log is not None else subprocess.DEVNULL
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)


def wait_ready(
    url: str, server: subprocess.Popen[bytes] | None = None, timeout: float = 300
) -> int:
    """The server's item count once /readyz answers 200; raises when ``server`` exits first or
    the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return int(response.json()["items"])
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


@dataclass(frozen=True)
class Running:
    """A server started by :func:`running`: its address, process, items and start-up seconds."""

    url: str
    process: subprocess.Popen[bytes]
    items: int
    ready_s: float


@contextlib.contextmanager
def running(
    index: Path, inference: str, settings: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[Running]:
    """``diml serve`` of ``index`` (see :func:`serve`) on a free port, ready, for the block;
    stopped after it. Where the block fails, the last 4,000 characters of the server's output
    are printed first."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = serve(index, port, inference, settings, log)
        started = time.perf_counter()
        try:
            items = wait_ready(url, server, timeout)
            yield Running(url, server, items, round(time.perf_counter() - started, 1))
        except BaseException:
            log.seek(0)
            print(log.read().decode(errors="replace")[-4000:], flush=True)
            raise
        finally:
            server.terminate()
            server.wait(timeout=60)


def stages(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            out[name] = float(duration)
    return out


@dataclass
class Load:
    """What ``requests`` searches sent by ``clients`` threads measured: each answered request's
    seconds and Server-Timing stages, the other statuses, and the wall time of the whole."""

    latencies: list[float]
    timings: list[dict[str, float]]
    errors: list[int]
    wall: float


def send(url: str, images: list[bytes], clients: int, requests: int) -> Load:
    """POST /search (k=10, rerank_k=100, explain on) ``requests`` times from ``clients``
    threads, cycling through ``images``."""
    load = Load([], [], [], 0.0)
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            for i in counter:
                start = time.perf_counter()
                response = client.post(
                    f"{url}/search",
                    files={"image": ("q.jpg", images[i % len(images)], "image/jpeg")},
                    params={"k": 10, "rerank_k": 100, "explain": "true"},
                )
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        load.latencies.append(elapsed)
                        load.timings.append(stages(response.headers.get("server-timing", "")))
                    else:
                        load.errors.append(response.status_code)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.wall = time.perf_counter() - start
    return load


def run(url: str, images: list[bytes], clients: int, requests: int) -> dict[str, object]:
    load = send(url, images, clients, requests)
    latencies = sorted(load.latencies)
    return {
        "clients": clients,
        "p50": 1e3 * latencies[len(latencies) // 2],
        "p95": 1e3 * latencies[int(0.95 * (len(latencies) - 1))],
        "rps": len(latencies) / load.wall,
        "errors": len(load.errors),
        "stages": {n: statistics.median(t.get(n, 0.0) for t in load.timings) for n in STAGES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cub", type=Path, required=True, help="CUB folder: gallery and queries")
    parser.add_argument("--index", type=Path, help="serve this index instead of building one")
    parser.add_argument("--requests", type=int, default=60, help="requests per concurrency level")
    parser.add_argument(
        "--inference",
        choices=[*RUNTIMES, "both"],
        default="both",
        help="backbone runtime of the server; both (default): ONNX Runtime, then PyTorch, over "
        "the same index in one run, so that their ratio holds on a noisy machine",
    )
    args = parser.parse_args()
    queries = sorted((args.cub / "images").rglob("*.jpg"))[::17][:40]
    images = [p.read_bytes() for p in queries]
    runtimes = ["onnx", "torch"] if args.inference == "both" else [args.inference]
    with tempfile.TemporaryDirectory() as tmp:
        index = args.index
        if index is None:
            index = Path(tmp) / "index"
            print("indexing the gallery ...", flush=True)
            build(args.cub, index, runtimes[0])  # the index does not depend on the runtime
        rows = [row for runtime in runtimes for row in measure(index, runtime, images, args)]
    print(
        f"\n/search over loopback: default model (MobileNetV2 head-less, 4x4 grid), k=10, "
        f"rerank_k=100, explain on, {args.requests} requests per row"
    )
    print(
        f"  {'backbone':8} {'clients':>7} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'errors':>6}   "
        "server median ms: " + " / ".join(STAGES)
    )
    for row in rows:
        print(row)


def measure(index: Path, runtime: str, images: list[bytes], args: argparse.Namespace) -> list[str]:
    rows = []
    with running(index, runtime) as server:
        url = server.url
        inference = httpx.get(f"{url}/readyz").json()["inference"]
        run(url, images, 1, 5)  # warm-up
        for clients in (1, 4, 16):
            r = run(url, images, clients, args.requests)
            s = r["stages"]
            assert isinstance(s, dict)
            rows.append(
                f"  {inference:8} {clients:7d} {r['p50']:8.1f} {r['p95']:8.1f} {r['rps']:7.1f} "
                f"{r['errors']:6d}   " + " / ".join(f"{s[n]:.1f}" for n in STAGES)
            )
    return rows


if __name__ == "__main__":
    main()
