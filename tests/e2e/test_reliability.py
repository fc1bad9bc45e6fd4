"""The reliability scripts (``bench/crash_test.py``, ``bench/soak.py``) on a small scale, and
the crash test's checker against a server that broke its promises."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from tests.live_server import REPO, Server

sys.path.insert(0, str(REPO / "bench"))
crash_test = pytest.importorskip("crash_test")
soak = pytest.importorskip("soak")


def test_kill_9_rounds_keep_every_acknowledged_write(served: dict[str, Path]) -> None:
    code = crash_test.main(["--kills", "3", "--clients", "3", "--index", str(served["index"]),
                            "--checkpoint", str(served["checkpoint"])])  # fmt: skip
    assert code == 0


def test_the_checker_sees_lost_resurrected_and_orphaned_writes(
    served: dict[str, Path], fresh_index: Path
) -> None:
    ledger = crash_test.Ledger()
    ledger.present[5] = "0" * 64  # acknowledged, but the server holds other bytes under 5
    ledger.present[999] = "1" * 64  # acknowledged, but not there at all
    ledger.deleted.add(3)  # acknowledged as deleted, but still listed
    ledger.cut_adds.append("2" * 64)  # cut short and absent: allowed
    uploads = fresh_index / "uploads"
    uploads.mkdir(exist_ok=True)
    (uploads / hashlib.sha256(b"cut short").hexdigest()).write_bytes(b"cut short")
    (uploads / ("f" * 64)).write_bytes(b"not what its name says")
    server = Server(fresh_index, served["checkpoint"])
    try:
        count = server.wait_ready().json()["items"]
        with httpx.Client(base_url=server.url, timeout=30) as http:
            broken = crash_test.settle(http, ledger, uploads, count)
    finally:
        server.stop()
    assert any("add 5 " in b for b in broken)
    assert any("add 999 " in b for b in broken)
    assert any("delete 3 is back" in b for b in broken)
    assert "2" * 64 in ledger.never  # resolved: it must stay absent from now on
    # The server sweeps the uploads it wrote when it starts (named by their bytes' sha256):
    # what is left over is reported.
    assert [b for b in broken if "orphan" in b] == ["orphan upload ffffffffffff"]


def test_a_short_soak_serves_every_kind_without_server_errors(
    served: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    index = tmp_path / "index"
    shutil.copytree(served["index"], index)
    code = soak.main(["--minutes", "0.15", "--clients", "4", "--warmup-s", "3",
                      "--index", str(index), "--checkpoint", str(served["checkpoint"]),
                      "--json", str(out)])  # fmt: skip
    summary = out.read_text()
    assert '"server_errors": 0' in summary
    for kind in ("search", "search by id", "explain", "browse", "add"):
        assert f'"{kind}"' in summary
    assert code == 0, summary[:2000]
