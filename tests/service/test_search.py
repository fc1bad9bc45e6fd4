from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import assert_whole_score, png


def _image(served: dict[str, Path], index: int = 4) -> bytes:
    return sorted(served["gallery"].rglob("*.png"))[index].read_bytes()


def test_search_explains_every_result(client: TestClient, served: dict[str, Path]) -> None:
    response = client.post("/search", files={"image": ("q.png", _image(served))}, params={"k": 5})
    assert response.status_code == 200
    assert "rerank;dur=" in response.headers["server-timing"]
    hits = response.json()["results"]
    assert len(hits) == 5
    assert hits[0]["global_similarity"] == pytest.approx(1.0, abs=1e-3)  # the image itself
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        e = hit["explanation"]
        assert hit["reranked"] is True
        weight = e["structural_weight"]
        assert hit["score"] == pytest.approx(
            hit["global_similarity"] + weight * hit["structural_similarity"]
        )
        assert_whole_score(e)
        assert e["score"] == pytest.approx(hit["score"], abs=1e-6)
        assert len(e["query_regions"]) == 4  # the tiny model's 2 x 2 grid
        assert len(e["matches"]) == 5  # the default: 5 strongest of the 4 x 4 part pairs
        assert "plan" not in e
        assert hit["image_url"] == f"/gallery/{hit['id']}/image"


def test_every_search_route_explains_the_whole_score(
    client: TestClient, served: dict[str, Path]
) -> None:
    """By id, with examples, grouped, in a batch: the query's and the result's regions account
    for the score; gallery pictures are embedded once, then their bases come from the cache."""
    engine = client.app.state.engine  # type: ignore[attr-defined]
    image = ("q.png", _image(served))
    examples = client.post(
        "/search/examples", params={"k": 3, "positive_id": [1, 2]}, files=[("positive", image)]
    )
    grouped = client.post(
        "/search", params={"k": 2, "group_by": "label", "group_size": 2}, files={"image": image}
    )
    batch = client.post(
        "/search/batch",
        params={"k": 3},
        files=[("images", image), ("images", ("r.png", _image(served, 7)))],
    )
    answers = [
        client.post("/search/by-id/3", params={"k": 3}).json()["results"],
        examples.json()["results"],
        grouped.json()["results"],
        *[q["results"] for q in batch.json()["queries"]],
    ]
    for hits in answers:
        assert hits
        for hit in hits:
            assert_whole_score(hit["explanation"])
    assert engine.bases.size > 0
    calls = []
    original = engine.stored_input
    engine.stored_input = lambda item: calls.append(item.id) or original(item)
    try:
        again = client.post("/search/by-id/3", params={"k": 3}).json()["results"]
    finally:
        engine.stored_input = original
    assert calls == []  # every map was in the cache
    assert again == answers[0]


def test_explained_hits_are_bounded(client: TestClient, served: dict[str, Path]) -> None:
    files = {"image": ("q.png", _image(served))}
    refused = client.post("/search", params={"k": 101}, files=files)
    assert refused.status_code == 422
    assert "at most 100 hits are explained" in refused.json()["error"]["message"]
    grouped = client.post("/search", params={"k": 40, "group_by": "label", "group_size": 3},
                          files=files)  # fmt: skip
    assert grouped.status_code == 422
    plain = client.post("/search", params={"k": 101, "explain": "false"}, files=files)
    assert plain.status_code == 200


def test_a_gallery_picture_gone_leaves_its_side_unsplit_and_says_so(
    served: dict[str, Path], fresh_index: Path, tmp_path: Path
) -> None:
    from service.app import create_app
    from tests.service.conftest import settings_for

    moved = tmp_path / "gallery"
    app = create_app(settings_for(served, fresh_index), load_in_background=False)
    with TestClient(app) as c:
        item = c.get("/gallery/2").json()
        path = Path(c.app.state.engine.items([2])[2].path)  # type: ignore[attr-defined]
        moved.mkdir()
        path.rename(moved / path.name)
        try:
            e = c.post("/explain", data={"a_id": "0", "b_id": "2"}).json()
        finally:
            (moved / path.name).rename(path)
    assert item["id"] == 2
    assert e["contributions"]["global"]["result"] is None
    assert e["contributions"]["global"]["query"] is not None
    assert e["contributions"]["residual"]["result"] == pytest.approx(
        e["global_similarity"], abs=1e-5
    )
    assert_whole_score(e, exact=False)


def test_without_reranking_results_keep_the_global_order(
    client: TestClient, served: dict[str, Path]
) -> None:
    params = {"k": 6, "rerank_k": 0, "explain": "false"}
    hits = client.post("/search", files={"image": ("q.png", _image(served))}, params=params).json()
    ranks = [h["global_rank"] for h in hits["results"]]
    assert ranks == [1, 2, 3, 4, 5, 6]
    assert all(h["reranked"] is False for h in hits["results"])
    assert all("explanation" not in h for h in hits["results"])
    weight = hits["structural_weight"]
    for h in hits["results"]:  # one scale for every hit: the ranking score
        assert h["score"] == pytest.approx(
            h["global_similarity"] + weight * h["structural_similarity"]
        )


def test_partial_reranking_keeps_the_tail_in_global_order(
    client: TestClient, served: dict[str, Path]
) -> None:
    params = {"k": 8, "rerank_k": 3}
    hits = client.post("/search", files={"image": ("q.png", _image(served))}, params=params).json()
    results = hits["results"]
    assert sorted(h["global_rank"] for h in results[:3]) == [1, 2, 3]
    assert [h["global_rank"] for h in results[3:]] == [4, 5, 6, 7, 8]


def test_by_id_finds_the_item_first(client: TestClient) -> None:
    for item_id in (0, 7, 11):
        hits = client.post(f"/search/by-id/{item_id}", params={"k": 3}).json()["results"]
        assert hits[0]["id"] == item_id
    assert client.post("/search/by-id/999").status_code == 404


def test_batch_search_answers_in_order(client: TestClient, served: dict[str, Path]) -> None:
    files = [("images", (f"{i}.png", _image(served, i))) for i in (2, 9)]
    queries = client.post("/search/batch", files=files, params={"k": 2}).json()["queries"]
    first_keys = [q["results"][0]["key"] for q in queries]
    names = [
        p.relative_to(served["gallery"]).as_posix()
        for p in sorted(served["gallery"].rglob("*.png"))
    ]
    assert first_keys == [names[2], names[9]]


def test_more_results_than_items(client: TestClient, served: dict[str, Path]) -> None:
    hits = client.post("/search", files={"image": ("q.png", png())}, params={"k": 50}).json()
    assert len(hits["results"]) == 12


def test_explain_uploads_ids_and_both(client: TestClient, served: dict[str, Path]) -> None:
    image = _image(served, 0)
    by_upload = client.post(
        "/explain", files={"a": ("a.png", image), "b": ("b.png", _image(served, 1))}
    )
    by_ids = client.post("/explain", data={"a_id": "0", "b_id": "1"})
    mixed = client.post("/explain", data={"b_id": "1"}, files={"a": ("a.png", image)})
    for response in (by_upload, by_ids, mixed):
        assert response.status_code == 200, response.text
        e = response.json()
        assert len(e["plan"]) == 4
        assert sum(map(sum, e["plan"])) == pytest.approx(1.0, abs=1e-4)
        assert_whole_score(e)
    assert by_upload.json()["score"] == pytest.approx(by_ids.json()["score"], abs=2e-3)
    got = client.get("/explain", params={"a_id": 0, "b_id": 1, "format": "png"})
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/png"
    assert got.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("data", "files"),
    [({}, {}), ({"a_id": "0"}, {"a": ("a.png", b"x")}), ({"a_id": "0"}, {})],
)
def test_explain_needs_exactly_one_of_each_side(
    client: TestClient, data: dict[str, str], files: dict[str, tuple[str, bytes]]
) -> None:
    response = client.post("/explain", data=data, files=files or None)
    assert response.status_code == 422
    assert "exactly one of" in response.json()["error"]["message"]


def test_device_search_gives_the_same_answers(served: dict[str, Path]) -> None:
    """The torch exact-search path (the GPU's), with the part grids read from the index or
    kept on the device, answers as FAISS does, here on the CPU; /readyz says which runs."""
    from service.app import create_app
    from tests.service.conftest import settings_for

    image = png()
    answers = []
    ways = [(False, False, "faiss", "index"), (True, False, "torch", "index"),
            (None, True, "torch", "device")]  # fmt: skip
    for device_search, device_grids, coarse, grids in ways:
        settings = settings_for(served, device_search=device_search, device_grids=device_grids)
        with TestClient(create_app(settings, False)) as c:
            ready = c.get("/readyz").json()
            assert (ready["coarse_search"], ready["grids"]) == (coarse, grids)
            params = {"k": 6, "rerank_k": 9}
            response = c.post("/search", files={"image": ("q.png", image)}, params=params)
            assert response.status_code == 200
            answers.append([(h["id"], round(h["score"], 5), round(h["structural_similarity"], 5))
                            for h in response.json()["results"]])  # fmt: skip
    assert answers[0] == answers[1] == answers[2]


def test_grids_on_the_device_need_device_search(served: dict[str, Path]) -> None:
    from pydantic import ValidationError

    from tests.service.conftest import settings_for

    with pytest.raises(ValidationError, match="DIML_DEVICE_GRIDS needs DIML_DEVICE_SEARCH"):
        settings_for(served, device_search=False, device_grids=True)


def test_a_model_with_weight_0_returns_the_global_order_with_explanations(
    client: TestClient, served: dict[str, Path]
) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    query = {"image": ("q.png", _image(served, 6))}
    params = {"k": 5, "rerank_k": 100}
    weighted = client.post("/search", files=query, params=params).json()["results"]
    published = engine.config
    engine.config = published.with_structural_weight(0.0)
    try:
        plain = client.post("/search", files=query, params=params).json()["results"]
    finally:
        engine.config = published
    assert [h["global_rank"] for h in plain] == [1, 2, 3, 4, 5]
    assert all(h["score"] == pytest.approx(h["global_similarity"]) for h in plain)
    # Only the 5 hits were matched, and each match is the one the weighted search made.
    structural = {h["id"]: h["structural_similarity"] for h in weighted}
    for hit in plain:
        assert hit["explanation"]["structural_weight"] == 0
        if hit["id"] in structural:
            assert hit["structural_similarity"] == pytest.approx(structural[hit["id"]], abs=1e-5)


def test_search_and_evaluation_rank_alike(client: TestClient) -> None:
    """The service and `diml evaluate` apply one retrieval rule: for each gallery item, the
    hits of a search by its id (leaving the item itself out) come in the order evaluation
    ranks the other items for it."""
    import torch

    from model.datasets import Record
    from model.evaluation import rank_all
    from model.loading import embed_records

    engine = client.app.state.engine  # type: ignore[attr-defined]
    items = engine.index.items(list(range(engine.index.count)))
    records = [Record(Path(items[i].path), 1) for i in sorted(items)]
    embedding, _ = embed_records(engine.model, records, torch.device("cpu"))
    depth = len(records) - 1
    for rerank_k in (depth, 4):
        rankings = rank_all(embedding, depth, rerank_k, engine.config.matching)
        for item in (0, 5, 11):
            params = {"k": depth + 1, "rerank_k": rerank_k + 1, "explain": False}
            hits = client.post(f"/search/by-id/{item}", params=params).json()["results"]
            served = [h["id"] for h in hits if h["id"] != item]
            assert served == rankings.reranked_order[item].tolist(), (rerank_k, item)


def test_concurrent_searches_are_batched_and_answer_as_alone(client: TestClient) -> None:
    """Searches queued together go through one coarse search and one structural match, and
    each gets what it would have got alone (its own k, rerank_k and explanations)."""
    import asyncio

    from service.batching import SearchJob
    from service.metrics import StageTimer
    from service.search import SearchOptions

    engine = client.app.state.engine  # type: ignore[attr-defined]
    ids = [0, 3, 7, 11]
    stored = [engine.stored(i) for i in ids]
    options = [SearchOptions(k=3 + i, rerank_k=2 * i, explain=i % 2 == 0) for i in range(4)]
    timer = lambda: StageTimer(client.app.state.metrics)  # noqa: E731  # type: ignore[attr-defined]
    alone = [
        engine.search_jobs([SearchJob(e, [g], o, timer())])[0][0].hits
        for (e, g, _), o in zip(stored, options, strict=True)
    ]
    sizes: list[int] = []
    original = engine.search_jobs

    def recording(jobs: list) -> list:  # type: ignore[type-arg]
        sizes.append(len(jobs))
        return original(jobs)

    engine.search_jobs = recording
    engine.searcher.window_s = 5.0  # bounds the wait; the batcher stops once none is arriving
    engine.arriving = len(stored)  # as after one embedding batch of four requests
    try:

        async def together() -> list:  # type: ignore[type-arg]
            pairs = zip(stored, options, strict=True)
            calls = [engine.find(SearchJob(e, [g], o, timer()), True) for (e, g, _), o in pairs]
            return await asyncio.gather(*calls)

        started = time.perf_counter()
        batched = [answer[0].hits for answer in asyncio.run(together())]
        waited = time.perf_counter() - started
    finally:
        engine.search_jobs = original
        engine.searcher.window_s = engine.settings.batch_window_ms / 1000
    assert sizes == [4]
    assert engine.arriving == 0
    assert waited < 4  # it did not wait out the window once the fourth query had come
    for a, b in zip(alone, batched, strict=True):
        assert [(h.item.id, h.reranked, h.global_rank) for h in a] == [
            (h.item.id, h.reranked, h.global_rank) for h in b
        ]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
        assert [h.explanation is None for h in a] == [h.explanation is None for h in b]


def test_the_staged_search_ranks_as_the_two_stage_rule_says(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch of queries with ragged needs (different rerank_k, offsets, a label filter)
    through the stages of service.search gives, for every query, the page of the rule computed
    directly over the stored arrays: global order, head re-sorted by global + w x structural,
    tail in global order."""
    import dataclasses

    import numpy as np
    import torch

    from index_builder import LabelFilter
    from model.matching import structural_match
    from service.batching import SearchJob
    from service.metrics import StageTimer
    from service.search import SearchOptions

    engine = client.app.state.engine  # type: ignore[attr-defined]
    matching = dataclasses.replace(engine.config.matching, structural_weight=1.0)
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, matching=matching))
    items, count = engine.page(0, 10_000)
    ids = np.array([i.id for i in items])
    vectors = torch.from_numpy(engine.index.vectors(ids))
    grids = torch.from_numpy(engine.index.grids(ids).astype(np.float32))
    label = items[0].label
    options = [
        SearchOptions(k=5, rerank_k=12, explain=False),
        SearchOptions(k=4, rerank_k=3, offset=2, explain=False),  # page past the head
        SearchOptions(k=3, rerank_k=30, offset=6, explain=False),
        SearchOptions(k=3, rerank_k=8, explain=False, where=LabelFilter(labels=(label,))),
    ]
    queries = [engine.stored(int(i))[:2] for i in ids[[1, 4, 7, 10]]]
    timer = StageTimer(client.app.state.metrics)  # type: ignore[attr-defined]
    jobs = [SearchJob(e, [g], o, timer) for (e, g), o in zip(queries, options, strict=True)]
    pages = [p[0] for p in engine.search_jobs(jobs)]
    for (query, _), o, page in zip(queries, options, pages, strict=True):
        allowed = np.array([o.where.labels is None or i.label in o.where.labels for i in items])
        sims = (vectors[allowed] @ query.vector[0]).numpy()
        order = np.argsort(-sims, kind="stable")
        head = order[: o.rerank_k]
        match = structural_match(query.parts, query.vector, grids[allowed][head][None],
                                 vectors[allowed][head][None], matching)  # fmt: skip
        resorted = head[torch.sort(match.score[0], descending=True, stable=True).indices.numpy()]
        ranking = np.r_[resorted, order[o.rerank_k :]]
        expected = ids[allowed][ranking[o.offset : o.offset + o.k]].tolist()
        assert [h.item.id for h in page.hits] == expected
        assert [h.global_rank for h in page.hits] == [
            int(np.nonzero(order == r)[0][0]) + 1 for r in ranking[o.offset : o.offset + o.k]
        ]
        assert page.next_offset == (o.offset + o.k if allowed.sum() > o.offset + o.k else None)
    assert count == len(items)
