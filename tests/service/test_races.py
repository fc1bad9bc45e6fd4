"""Requests that race a gallery change: the answer is whole, never a server error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine import Engine
from tests.service.conftest import png, settings_for


@pytest.fixture
def served_engine(
    served: dict[str, Path], fresh_index: Path
) -> Iterator[tuple[TestClient, Engine]]:
    """A client of a writable service, and its engine (to make another client's move)."""
    app = create_app(settings_for(served, fresh_index), load_in_background=False)
    with TestClient(app) as client:
        yield client, app.state.engine


def test_a_hit_deleted_before_its_explanation_is_finished_is_explained_without_its_split(
    served_engine: tuple[TestClient, Engine],
) -> None:
    client, engine = served_engine
    bases = engine.item_bases
    deleted: list[int] = []

    async def delete_first_then_bases(items: list[Any]) -> Any:
        # Another client deletes the top hit after the search found it.
        if not deleted:
            deleted.append(items[0].id)
            engine.remove(items[0].id)
        return await bases(items)

    engine.item_bases = delete_first_then_bases  # type: ignore[method-assign]
    r = client.post("/search", files={"image": ("q.png", png())}, params={"k": 3})
    assert r.status_code == 200, r.text
    hits = {h["id"]: h for h in r.json()["results"]}
    gone = hits[deleted[0]]["explanation"]["contributions"]
    assert gone["exact"] is False
    assert gone["global"]["result"] is None
    kept = [h for i, h in hits.items() if i != deleted[0]]
    assert all(h["explanation"]["contributions"]["exact"] for h in kept)
    assert client.get(f"/gallery/{deleted[0]}").status_code == 404


def test_grouped_and_example_searches_run_again_when_a_candidate_is_deleted_meanwhile(
    served_engine: tuple[TestClient, Engine],
) -> None:
    client, engine = served_engine
    match = engine._match
    calls: list[int] = []

    def delete_one_then_match(queries: Any, ids: Any, timer: Any) -> Any:
        # Another client deletes a candidate between the coarse search and the match.
        calls.append(len(ids))
        if len(calls) == 1:
            engine.remove(int(ids[0]))
        return match(queries, ids, timer)

    engine._match = delete_one_then_match  # type: ignore[method-assign]
    grouped = client.post("/search", files={"image": ("q.png", png())},
                          params={"group_by": "label", "k": 2})  # fmt: skip
    assert grouped.status_code == 200, grouped.text
    calls.clear()
    examples = client.post("/search/examples", files={"positive": ("p.png", png())})
    assert examples.status_code == 200, examples.text
    assert len(calls) >= 2  # searched again
