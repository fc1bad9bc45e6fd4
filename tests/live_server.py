"""A real ``diml serve`` in a child process, for the end-to-end tests and the reliability
scripts in ``bench/`` (crash and soak): started on a free port, its output drained as it comes,
stopped politely or killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``diml serve --index INDEX [--checkpoint CHECKPOINT]`` with ``env`` added to the
    environment (writes open to loopback clients unless ``env`` says otherwise)."""

    def __init__(self, index: Path, checkpoint: Path | None = None, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "DIML_ANONYMOUS_WRITES": "loopback",
            **env,
        }
        command = [sys.executable, "-m", "service.cli", "serve", "--index", str(index),
                   "--port", str(self.port)]  # fmt: skip
        if checkpoint is not None:
            command += ["--checkpoint", str(checkpoint)]
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # Drained as it comes: a server that writes more than the pipe holds would block.
        self._output = bytearray()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _drain(self) -> None:
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read1(65536):  # type: ignore[attr-defined]
            self._output += chunk

    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return self._output.decode(errors="replace")

    def wait_ready(self, timeout: float = 120) -> httpx.Response:
        """The first 200 of ``/readyz``; AssertionError if the server exits or never gets there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise AssertionError(f"the server exited: {self.output()[-2000:]}")
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200:
                    return response
                assert response.status_code == 503
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become ready")

    def rss_mb(self) -> float:
        """The server's resident memory now, in MiB (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the server."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=5)

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; SIGKILL if it does not stop within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reader.join(timeout=5)
