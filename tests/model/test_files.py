"""The one atomic-write rule (model.files.replacing) that every replaced file goes through."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.files import replacing, sha256_file, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    write_atomic(target, b"old")

    def failing_write() -> None:
        with replacing(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError):
        failing_write()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_clean_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    write_atomic(target, b"old")
    with replacing(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]
    assert sha256_file(target).startswith("11507a0e")  # sha256(b"new")
