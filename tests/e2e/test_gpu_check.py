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
    ours = [row for row in result["matching"]["rows"] if row["path"].startswith("ours")]
    for row in result["matching"]["rows"]:  # each rate is what its time says
        k = result["matching"]["k"]
        assert row["pairs_per_s"] == pytest.approx(row["queries"] * k / row["ms_per_call"] * 1e3)
    assert all(row["converged"] > 0.9 for row in ours), ours
    got = result["targets"]  # the targets report what was measured above, not a stale value
    assert got["rerank_one_query_ms"]["value"] == min(
        row["ms_per_call"] for row in ours if row["queries"] == 1
    )
    assert got["rerank_pairs_per_s"]["value"] == max(
        row["pairs_per_s"] for row in ours if row["queries"] > 1
    )
    p50 = search["clients_1"]["server_ms_without_decode"]["p50"]
    assert got["search_p50_ms_server_side"]["value"] == p50
    assert set(got) == {
        "rerank_one_query_ms",
        "rerank_pairs_per_s",
        "search_p50_ms_server_side",
        "index_build_vs_forward_only",
    }


def test_a_target_is_met_on_the_side_of_its_goal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from gpu_check import targets

    rows = [
        {"path": "published per-query rule", "queries": 1, "ms_per_call": 0.1, "pairs_per_s": 9e9},
        {"path": "ours, fused", "queries": 1, "ms_per_call": 0.25, "pairs_per_s": 4e5},
        {"path": "ours, pytorch", "queries": 1, "ms_per_call": 0.5, "pairs_per_s": 2e5},
        {"path": "ours, fused", "queries": 64, "ms_per_call": 2.0, "pairs_per_s": 3.2e7},
    ]
    results = {
        "matching": {"rows": rows},
        "search_synthetic": {"clients_1": {"server_ms_without_decode": {"p50": 6.0}}},
    }
    got = targets(results)
    assert got["rerank_one_query_ms"] == {"value": 0.25, "goal": 0.3, "met": True}
    assert got["rerank_pairs_per_s"] == {"value": 3.2e7, "goal": 5e7, "met": False}
    assert got["search_p50_ms_server_side"] == {"value": 6.0, "goal": 5.0, "met": False}
    assert got["index_build_vs_forward_only"] == {"value": None, "goal": 0.8, "met": None}
