"""Requests that race a gallery change: the answer is whole, never a server error."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from service.app import create_app
from service.deps import get_timer
from service.engine import Engine
from service.metrics import StageTimer
from tests.service.conftest import png, settings_for


@pytest.fixture
def served_engine(
    served: dict[str, Path], fresh_index: Path
) -> Iterator[tuple[TestClient, Engine]]:
    """A client of a writable service, and its engine (to make another client's move)."""
    app = create_app(settings_for(served, fresh_index), load_in_background=False)
    with TestClient(app) as client:
        yield client, app.state.engine


def _between_stages(client: TestClient, before: Callable[[str], None]) -> None:
    """Every request's stage timer calls ``before(stage)`` as each stage starts: the seam of
    :class:`service.metrics.StageTimer`, through the ``get_timer`` dependency."""

    def timer(request: Request) -> StageTimer:
        return StageTimer(request.app.state.metrics, before)

    client.app.dependency_overrides[get_timer] = timer  # type: ignore[attr-defined]


def _once(stage: str, act: Callable[[], object]) -> Callable[[str], None]:
    """A ``before`` hook that does ``act()`` as ``stage`` first starts."""
    done: list[bool] = []

    def before(name: str) -> None:
        if name == stage and not done:
            done.append(True)
            act()

    return before


def _top_hit(client: TestClient) -> int:
    r = client.post("/search", files={"image": ("q.png", png())}, params={"k": 1})
    return int(r.json()["results"][0]["id"])


def test_a_hit_deleted_before_its_explanation_is_finished_is_explained_without_its_split(
    served_engine: tuple[TestClient, Engine],
) -> None:
    client, engine = served_engine
    top = _top_hit(client)
    # Another client deletes the top hit after the search found it, before the global split.
    _between_stages(client, _once("explain_global", lambda: engine.remove(top)))
    r = client.post("/search", files={"image": ("q.png", png())}, params={"k": 3})
    assert r.status_code == 200, r.text
    hits = {h["id"]: h for h in r.json()["results"]}
    gone = hits[top]["explanation"]["contributions"]
    assert gone["exact"] is False
    assert gone["global"]["result"] is None
    kept = [h for i, h in hits.items() if i != top]
    assert all(h["explanation"]["contributions"]["exact"] for h in kept)
    assert client.get(f"/gallery/{top}").status_code == 404


@pytest.mark.parametrize(
    ("path", "part", "params"),
    [("/search", "image", {"group_by": "label", "k": 2}), ("/search/examples", "positive", {})],
)
def test_grouped_and_example_searches_run_again_when_a_candidate_is_deleted_meanwhile(
    served_engine: tuple[TestClient, Engine], path: str, part: str, params: dict[str, Any]
) -> None:
    client, engine = served_engine
    top = _top_hit(client)  # a candidate of either search
    stages: list[str] = []
    # Another client deletes it between the coarse search and the match.
    delete = _once("gather", lambda: engine.remove(top))

    def before(name: str) -> None:
        stages.append(name)
        delete(name)

    _between_stages(client, before)
    answer = client.post(path, files={part: ("q.png", png())}, params=params)
    assert answer.status_code == 200, answer.text
    assert stages.count("coarse_search") >= 2  # searched again
    assert top not in [h["id"] for h in answer.json()["results"]]
