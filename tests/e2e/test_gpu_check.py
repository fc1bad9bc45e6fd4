"""bench/gpu_check.py runs (on the CPU, small sizes) and writes the JSON its readers expect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_device_check_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick",
               "--inference", "torch", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    for name in ("environment", "matching", "search_synthetic"):
        assert "error" not in result[name], result[name]
    paths = {row["path"] for row in result["matching"]["rows"]}
    assert paths == {"published per-query rule", "ours, pytorch"}
    search = result["search_synthetic"]
    assert search["items"] == 2_000
    for clients in ("clients_1", "clients_16"):
        assert search[clients]["errors"] == []
        assert search[clients]["requests"] > 0
        assert search[clients]["server_ms_without_decode"]["p50"] > 0
    assert search["readyz"]["grids"] == "index"  # on the CPU by default; then the other way:
    other = search["grids_other_way"]
    assert (other["readyz"]["coarse_search"], other["readyz"]["grids"]) == ("torch", "device")
    assert other["clients_1"]["errors"] == []
    assert "gather" in other["clients_1"]["stage_median_ms"]
    assert set(result["targets"]) == {
        "rerank_one_query_ms",
        "rerank_pairs_per_s",
        "search_p50_ms_server_side",
        "index_build_vs_forward_only",
    }
