"""Filters, paging and score thresholds on /search, /search/by-id and /search/batch (the tiny
gallery: 12 pictures in class0..class2, a model whose structural weight is 1, so re-ranking
reorders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from index_builder.limits import MAX_LABEL_LENGTH
from tests.service.conftest import png


def _search(client: TestClient, item: int = 5, **params: Any) -> dict[str, Any]:
    response = client.post(f"/search/by-id/{item}", params={"explain": False, **params})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _labels(answer: dict[str, Any]) -> list[str]:
    return [h["label"] for h in answer["results"]]


def test_a_label_filter_returns_only_those_labels_and_k_of_them(client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    assert engine.config.matching.structural_weight != 0  # the re-ranking path is exercised
    only = _search(client, label="class1", k=10)
    assert _labels(only) == ["class1"] * 4  # every item of that label, though 8 others rank
    two = _search(client, label=["class0", "class2"], k=8)
    assert sorted(_labels(two)) == ["class0"] * 4 + ["class2"] * 4
    without = _search(client, exclude_label="class1", k=20)
    assert len(without["results"]) == 8
    assert "class1" not in _labels(without)
    both = _search(client, label=["class0", "class1"], exclude_label="class1", k=20)
    assert _labels(both) == ["class0"] * 4
    none = _search(client, label="no-such-label")
    assert none["results"] == []
    assert none["next_offset"] is None
    # The filter is applied in the coarse search: the k best of the label, not fewer.
    unfiltered = _search(client, k=12, rerank_k=0)
    best = [h["id"] for h in unfiltered["results"] if h["label"] == "class2"][:2]
    assert [h["id"] for h in _search(client, label="class2", k=2, rerank_k=0)["results"]] == best


def test_filters_apply_to_uploads_and_batches(client: TestClient) -> None:
    files = {"image": ("q.png", png())}
    hits = client.post("/search", files=files, params={"label": "class2", "k": 12}).json()
    assert [h["label"] for h in hits["results"]] == ["class2"] * 4
    batch = [("images", (f"{i}.png", png())) for i in range(2)]
    answer = client.post("/search/batch", files=batch, params={"exclude_label": "class0"}).json()
    for query in answer["queries"]:
        assert len(query["results"]) == 8
        assert "class0" not in _labels(query)


@pytest.mark.parametrize(("rerank_k", "k"), [(0, 3), (4, 3), (5, 2), (100, 4)])
def test_pages_continue_one_ranking_across_the_reranking_boundary(
    client: TestClient, rerank_k: int, k: int
) -> None:
    whole = _search(client, k=12, rerank_k=rerank_k)
    assert whole["next_offset"] is None
    ranking = [(h["id"], h["global_rank"], h["reranked"]) for h in whole["results"]]
    pages, offset = [], 0
    while offset is not None:
        page = _search(client, k=k, rerank_k=rerank_k, offset=offset)
        assert page["offset"] == offset
        pages += [(h["id"], h["global_rank"], h["reranked"]) for h in page["results"]]
        offset = page["next_offset"]
    assert pages == ranking  # no repeats, no gaps, the same order
    assert _search(client, k=5, offset=12)["results"] == []


def test_every_hit_has_one_score_scale_and_min_score_drops_exactly_those_below(
    client: TestClient,
) -> None:
    whole = _search(client, item=3, k=12, rerank_k=6)
    weight = whole["structural_weight"]
    for hit in whole["results"]:
        assert hit["score"] == pytest.approx(
            hit["global_similarity"] + weight * hit["structural_similarity"], abs=1e-6
        )
    scores = sorted(h["score"] for h in whole["results"])
    threshold = (scores[5] + scores[6]) / 2
    kept = _search(client, item=3, k=12, rerank_k=6, min_score=threshold)
    expected = [h["id"] for h in whole["results"] if h["score"] >= threshold]
    assert [h["id"] for h in kept["results"]] == expected
    assert len(expected) == 6
    # A threshold keeps pages aligned to the ranking: each page filters its own window.
    first = _search(client, item=3, k=6, rerank_k=6, min_score=threshold)
    second = _search(client, item=3, k=6, rerank_k=6, min_score=threshold, offset=6)
    assert [h["id"] for h in first["results"] + second["results"]] == expected


@pytest.mark.parametrize(
    "params",
    [
        {"min_score": "nan"},
        {"min_score": "inf"},
        {"offset": "-1"},
        {"offset": "10001"},
        {"label": ""},
        {"label": "x" * (MAX_LABEL_LENGTH + 1)},
        {"exclude_label": [str(i) for i in range(101)]},
    ],
)
def test_bad_feature_parameters_get_422(client: TestClient, params: dict[str, Any]) -> None:
    response = client.post("/search/by-id/0", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_device_search_filters_as_faiss_does(served: dict[str, Path]) -> None:
    from service.app import create_app
    from tests.service.conftest import settings_for

    answers = []
    for device_search in (False, True):
        app = create_app(settings_for(served, device_search=device_search), False)
        with TestClient(app) as c:
            params = {"label": ["class0", "class1"], "exclude_label": "class0", "k": 6}
            answers.append([h["id"] for h in _search(c, item=2, **params)["results"]])
    assert answers[0] == answers[1]
    assert len(answers[0]) == 4


def _grouped(client: TestClient, **params: Any) -> dict[str, Any]:
    return _search(client, group_by="label", **params)


@pytest.mark.parametrize("rerank_k", [0, 100])
def test_group_by_label_gives_each_labels_best_hits_in_ranking_order(
    client: TestClient, rerank_k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _search(client, item=4, k=12, rerank_k=rerank_k)["results"]
    expected: dict[str, list[int]] = {}
    for hit in whole:  # groups in the order of their best hit, each its best 2 in order
        members = expected.setdefault(hit["label"], [])
        if len(members) < 2:
            members.append(hit["id"])
    answer = _grouped(client, item=4, k=3, group_size=2, rerank_k=rerank_k)
    groups = [(g["label"], [h["id"] for h in g["results"]]) for g in answer["groups"]]
    assert groups == list(expected.items())
    assert [h["id"] for h in answer["results"]] == [i for _, ids in groups for i in ids]
    assert answer["next_offset"] is None
    second = _grouped(client, item=4, k=1, group_size=2, offset=1, rerank_k=rerank_k)
    assert [g["label"] for g in second["groups"]] == [groups[1][0]]
    assert second["next_offset"] == 2
    # Starting too shallow, the search goes deeper until the groups are full.
    engine = client.app.state.engine  # type: ignore[attr-defined]
    monkeypatch.setattr(engine.retrieval, "group_depth", 0.25)
    deep = _grouped(client, item=4, k=3, group_size=4, rerank_k=0)
    assert [len(g["results"]) for g in deep["groups"]] == [4, 4, 4]


def test_group_by_bounds_and_filters(client: TestClient) -> None:
    refused = client.post(
        "/search/by-id/0", params={"group_by": "label", "k": 11, "group_size": 100}
    )
    assert refused.status_code == 422
    assert "group_size" in refused.json()["error"]["message"]
    assert client.post("/search/by-id/0", params={"group_by": "colour"}).status_code == 422
    only = _grouped(client, label=["class0", "class2"], k=5, group_size=3)
    assert sorted(g["label"] for g in only["groups"]) == ["class0", "class2"]
    batch = [("images", (f"{i}.png", png())) for i in range(2)]
    answer = client.post("/search/batch", files=batch, params={"group_by": "label", "k": 2})
    assert [len(q["groups"]) for q in answer.json()["queries"]] == [2, 2]


def test_grouped_and_example_searches_time_the_same_stages(client: TestClient) -> None:
    """Every kind of search reports its coarse search, gathering, re-ranking and explanations
    apart (the Server-Timing header), as the batched search does."""
    answers = [
        client.post("/search/by-id/4", params={"group_by": "label", "k": 2}),
        client.post("/search/examples", params={"positive_id": 4, "k": 3}),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        timed = {part.split(";")[0] for part in answer.headers["server-timing"].split(", ")}
        assert {"coarse_search", "gather", "rerank", "explain"} <= timed
