"""``GET /duplicates`` from the cached neighbour graph: reads go on while it is matched, other
thresholds and concurrent callers reuse it, gallery changes match only the new pairs, and a
match cut short by the deadline is continued, not restarted. The answers are checked against
the exhaustive reference of tests/index_builder/duplicates_reference.py."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from index_builder import duplicates
from model.matching import match_pairs
from service.app import create_app
from service.engine import Engine
from tests.index_builder.duplicates_reference import exhaustive_groups
from tests.service.conftest import settings_for

ALL_PAIRS = 12 * 11 // 2  # the served gallery's 12 items each have the 11 others as neighbours


class Matches:
    """Stands in for ``match_pairs`` inside index_builder.duplicates: counts the pairs matched
    and can be made slow (``delay`` seconds a call); ``started`` is set by the first call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.pairs: list[int] = []
        self.started = threading.Event()

    def __call__(self, a: Any, b: Any, config: Any) -> Any:
        self.started.set()
        time.sleep(self.delay)
        self.pairs.append(len(a))
        return match_pairs(a, b, config)

    @property
    def count(self) -> int:
        return sum(self.pairs)


@pytest.fixture
def matches(monkeypatch: pytest.MonkeyPatch) -> Matches:
    counter = Matches()
    monkeypatch.setattr(duplicates, "match_pairs", counter)
    return counter


def _serve(served: dict[str, Path], index: Path | None = None, **extra: object) -> TestClient:
    return TestClient(create_app(settings_for(served, index, **extra), load_in_background=False))


@pytest.fixture
def client(served: dict[str, Path]) -> Iterator[TestClient]:
    with _serve(served) as c:
        yield c


def _groups(client: TestClient, threshold: float = 0.8, structural: float = 0.7) -> Any:
    params = {"threshold": threshold, "structural_threshold": structural, "limit": 200}
    r = client.get("/duplicates", params=params)
    assert r.status_code == 200, r.text
    return [([i["id"] for i in g["items"]], [(p["a"], p["b"]) for p in g["pairs"]])
            for g in r.json()["groups"]]  # fmt: skip


def _reference(client: TestClient, threshold: float, structural: float) -> Any:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    return exhaustive_groups(engine.index, engine.config.matching, threshold, structural, 16)


def test_gallery_reads_answer_while_duplicates_are_matched(
    client: TestClient, matches: Matches
) -> None:
    matches.delay = 3.0
    with ThreadPoolExecutor(1) as pool:
        finding = pool.submit(client.get, "/duplicates", params={"threshold": -1})
        assert matches.started.wait(30)
        started = time.monotonic()
        read = client.get("/gallery/3")
        read_s = time.monotonic() - started
        read_before_the_end = not finding.done()
        assert finding.result().status_code == 200
    assert read.status_code == 200
    assert read_before_the_end, f"GET /gallery/3 waited for the duplicates ({read_s:.1f} s)"
    assert read_s < 1.5


def test_other_thresholds_reuse_the_matched_pairs(client: TestClient, matches: Matches) -> None:
    assert _groups(client, 0.9, 0.8) == _reference(client, 0.9, 0.8)
    first = matches.count
    assert 0 < first < ALL_PAIRS  # only the pairs that 0.9 proposes
    for threshold, structural in [(0.95, 0.5), (0.9, 0.0), (1.0, 0.0)]:
        assert _groups(client, threshold, structural) == _reference(client, threshold, structural)
    assert matches.count == first
    whole = _groups(client, -1.0, -1.0)
    assert matches.count == ALL_PAIRS  # lower: the other pairs, each once
    assert whole == _reference(client, -1.0, -1.0)
    for threshold, structural in [(0.5, 0.5), (0.8, 0.7), (0.0, 0.9), (0.9, 0.8)]:
        assert _groups(client, threshold, structural) == _reference(client, threshold, structural)
    assert matches.count == ALL_PAIRS


def test_concurrent_callers_share_one_computation(client: TestClient, matches: Matches) -> None:
    matches.delay = 1.0
    thresholds = [-1.0, -0.5, 0.2, 0.9]
    with ThreadPoolExecutor(len(thresholds)) as pool:
        first = pool.submit(_groups, client, thresholds[0], 0.5)
        assert matches.started.wait(30)
        rest = [pool.submit(_groups, client, t, 0.5) for t in thresholds[1:]]
        answers = [first.result(), *(r.result() for r in rest)]
    assert matches.count == ALL_PAIRS
    for threshold, groups in zip(thresholds, answers, strict=True):
        assert groups == _reference(client, threshold, 0.5)


def test_adds_and_removes_match_only_the_new_pairs(
    served: dict[str, Path], fresh_index: Path, matches: Matches
) -> None:
    with _serve(served, fresh_index) as client:
        before = _groups(client)
        _groups(client, -1.0, -1.0)
        assert matches.count == ALL_PAIRS
        original = sorted(served["gallery"].rglob("*.png"))[0]
        copy = io.BytesIO()
        Image.open(original).convert("RGB").save(copy, "JPEG", quality=95)
        added = client.post("/gallery", files={"images": ("copy.jpg", copy.getvalue())})
        assert added.status_code == 201, added.text
        new = added.json()["added"][0]["id"]
        after_add = _groups(client, -1.0, -1.0)
        assert matches.count == ALL_PAIRS + 12  # the new item's pairs only
        assert after_add == _reference(client, -1.0, -1.0)
        grouped = _groups(client)
        assert grouped == _reference(client, 0.8, 0.7)
        group = next(ids for ids, _ in grouped if new in ids)
        keys = {
            i["id"]: i["key"] for i in client.get("/gallery", params={"limit": 50}).json()["items"]
        }
        assert any(keys[i].endswith(original.name) for i in group if i != new)
        assert client.delete(f"/gallery/{new}").status_code == 200
        assert _groups(client) == before
        assert _groups(client, -1.0, -1.0) == _reference(client, -1.0, -1.0)
        assert matches.count == ALL_PAIRS + 12  # nothing matched again


def test_a_match_cut_short_by_the_deadline_is_continued(
    served: dict[str, Path], matches: Matches, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(duplicates, "BATCH", 10)
    matches.delay = 0.3  # 7 batches: about 2 s, twice the deadline
    with _serve(served, request_timeout_s=1.0) as client:
        statuses = []
        for _ in range(6):
            r = client.get("/duplicates", params={"threshold": -1, "structural_threshold": -1})
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.json()["error"]["code"] == "deadline_exceeded"
        assert statuses[0] == 503
        assert statuses[-1] == 200
        assert matches.count == ALL_PAIRS  # each pair once, across the requests


def test_groups_say_their_whole_size(client: TestClient) -> None:
    body = client.get("/duplicates", params={"threshold": -1, "structural_threshold": -1}).json()
    assert body["total"] == 1
    (group,) = body["groups"]
    assert group["size"] == len(group["items"]) == 12
    assert group["pair_count"] == ALL_PAIRS
    assert len(group["pairs"]) == min(ALL_PAIRS, 100)
