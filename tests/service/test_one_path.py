"""One retrieval path: every route that ranks a query ranks it as ``diml evaluate`` does.

The same queries go through ``/search``, ``/search/batch``, a grouped search, a search by one
positive example and :func:`model.evaluation.rank_all` (the ranking ``diml evaluate`` scores),
on the embedded test gallery; the orders and scores must agree. ``rerank_k`` re-ranks half of
the gallery, so each ranking has a sorted head and a tail in global order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model import Embedding
from model.evaluation import head_scores, rank_all
from model.matching import ranking_score, rerank_positions
from service.engine import Engine

RERANK_K = 6
QUERIES = (1, 4, 7, 10)  # gallery pictures uploaded as queries
TOLERANCE = 1e-4  # Sinkhorn stops at tol 1e-4 per batch: scores agree to about that


def _reference(engine: Engine, query: Embedding) -> tuple[list[int], dict[int, float], list[int]]:
    """The query's ranking by :func:`rank_all` over the stored gallery: item ids best first,
    every item's score by id, and the global order."""
    items, count = engine.page(0, 10_000)
    ids = np.array([i.id for i in items])
    grids = torch.from_numpy(engine.index.grids(ids).astype(np.float32))
    gallery = Embedding(grids, torch.from_numpy(engine.index.vectors(ids)))
    both = Embedding.cat([gallery, query.without_maps()])  # the query last, never its own hit
    matching = engine.config.matching
    ranked = rank_all(both, count, RERANK_K, matching)
    every = head_scores(both, count, count, matching)  # both terms of every candidate
    score = ranking_score(every.global_similarity, every.structural_similarity,
                          matching.structural_weight)[count]  # fmt: skip
    scores = dict(zip(ids[every.order[count]].tolist(), score.tolist(), strict=True))
    return (
        ids[ranked.reranked_order[count]].tolist(),
        scores,
        ids[ranked.global_order[count]].tolist(),
    )


def _hits(answer: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["id"], h["score"]) for h in answer["results"]]


def _same(hits: list[tuple[int, float]], order: list[int], scores: dict[int, float]) -> None:
    assert [i for i, _ in hits] == order
    assert [s for _, s in hits] == pytest.approx([scores[i] for i in order], abs=TOLERANCE)


def test_every_route_ranks_as_the_evaluation_does(client: TestClient) -> None:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    assert engine.config.matching.structural_weight != 0  # the score can reorder the head
    count = engine.count
    pictures = [Path(engine.item(i).path or "").read_bytes() for i in QUERIES]
    labels = {i.id: i.label for i in engine.page(0, count)[0]}
    params = {"k": count, "rerank_k": RERANK_K, "explain": False}
    files = [
        ("images", (f"{i}.png", picture)) for i, picture in zip(QUERIES, pictures, strict=True)
    ]
    batch = client.post("/search/batch", params=params, files=files)
    assert batch.status_code == 200, batch.text
    reordered = False
    for picture, batched in zip(pictures, batch.json()["queries"], strict=True):
        query = asyncio.run(engine.embed([engine.decode(picture)]))  # as /search embeds it
        order, scores, global_order = _reference(engine, query)
        reordered |= order != global_order
        alone = client.post("/search", params=params, files={"image": ("q.png", picture)})
        _same(_hits(alone.json()), order, scores)
        _same(_hits(batched), order, scores)
        assert [h["global_rank"] for h in alone.json()["results"]] == [
            global_order.index(i) + 1 for i in order
        ]
        by_label = {**params, "k": 3, "group_by": "label", "group_size": count}
        grouped = client.post("/search", files={"image": ("q.png", picture)}, params=by_label)
        expected: dict[str | None, list[int]] = {}
        for i in order:  # groups in the order of their best hit, each in ranking order
            expected.setdefault(labels[i], []).append(i)
        groups = grouped.json()["groups"]
        assert [g["label"] for g in groups] == list(expected)
        for group in groups:
            _same(_hits(group), expected[group["label"]], scores)
        examples = client.post("/search/examples", files={"positive": ("p.png", picture)},
                               params={**params, "k": RERANK_K})  # fmt: skip
        _same(_hits(examples.json()), order[:RERANK_K], scores)  # the head: its candidates
    assert reordered  # re-ranking changed some order: the test can tell the rules apart


def test_the_rule_takes_a_head_per_query() -> None:
    """Ragged heads, as a batch of searches with different rerank_k asks, rank each row as
    the rule with that row's head alone."""
    score = torch.randn(5, 9)
    score[2, 7:] = float("-inf")  # candidates past the end of a short ranking
    heads = [0, 3, 9, 20, 5]
    ragged = rerank_positions(score, torch.tensor(heads))
    for row, head in enumerate(heads):
        assert ragged[row].tolist() == rerank_positions(score[row : row + 1], head)[0].tolist()
        top = torch.sort(score[row, :head], descending=True, stable=True).indices.tolist()
        assert ragged[row].tolist() == top + list(range(min(head, 9), 9))
