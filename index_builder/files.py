"""Crash-safe file operations: write aside, fsync, rename; a writer lock; test crash points."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.files import fsync_dir, write_atomic

CRASH_ENV = "DIML_TEST_CRASH_AT"


class IndexBusyError(RuntimeError):
    """Another process is writing to the same index."""


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` written aside, fsynced and renamed into place."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def writer_lock(folder: Path, create: bool = True) -> Iterator[None]:
    """Hold the index's writer lock (one writer at a time; readers need none).

    ``create``: make ``folder`` when it is missing (a build); without it, a missing folder
    raises FileNotFoundError and nothing is created, so that a command on a wrong path
    leaves no empty folder behind."""
    if create:
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


__all__ = ["CRASH_ENV", "IndexBusyError", "fsync_dir", "save_npy_atomic", "write_atomic"]
