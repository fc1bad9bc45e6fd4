"""Crash-safe file operations: write aside, fsync, rename; a writer lock; test crash points."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CRASH_ENV = "DIML_TEST_CRASH_AT"


class IndexBusyError(RuntimeError):
    """Another process is writing to the same index."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` written aside, fsynced and renamed into place."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[None]:
    """Hold the index's writer lock (one writer at a time; readers need none)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise IndexBusyError(
                f"{folder}: another process is writing to this index; wait for it to finish"
            ) from e
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def crashpoint(name: str) -> None:
    """Die at once with SIGKILL when the environment names this point (crash-safety tests)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
