"""The response budget (:mod:`service.budget`): every answer's worst case is bounded before any
work starts, and the deadline covers building and serialising the answer."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from index_builder.limits import MAX_KEY_LENGTH, MAX_LABEL_LENGTH
from model.explain import Explanation, PartMatch, Side
from service.app import create_app
from service.budget import (
    MAX_RESPONSE_BYTES,
    check_explanation,
    check_search,
    explanation_bytes,
    search_bytes,
)
from service.errors import ApiError
from service.routes.search import MAX_EXPLAINED_HITS, MAX_GROUPED_HITS
from service.schemas import ExamplesResponse, SearchResponse
from service.search import SearchOptions
from tests.service.conftest import png, settings_for

LONGEST_FLOAT = -2.2250738585072014e-308  # 24 characters in JSON, the most a double takes
LONGEST_ID = 2**63 - 1
MB = 2**20


def _explanation(grid: int, matches: int) -> Explanation:
    """An explanation whose every number takes its longest JSON form."""
    r, f = grid * grid, LONGEST_FLOAT
    side = Side([f] * r, [f] * r, [f] * r, f)
    match = PartMatch(r * r - 1, r * r - 1, f, f, f)
    return Explanation(f, grid, [[f] * r] * r, [[f] * r] * r, [f] * r, [f] * r, [(f,) * 4] * r,
                       [(f,) * 4] * r, side, side, [match] * matches, f, f, f, f, "unrelated",
                       False, f, 10**6)  # fmt: skip


def _hit(grid: int, matches: int, explain: bool, text: str) -> dict[str, Any]:
    f = LONGEST_FLOAT
    hit: dict[str, Any] = {
        "id": LONGEST_ID, "key": text * MAX_KEY_LENGTH, "label": text * MAX_LABEL_LENGTH,
        "score": f, "global_similarity": f, "structural_similarity": f, "reranked": False,
        "global_rank": LONGEST_ID, "verdict": "unrelated", "positive": 63,
        "image_url": f"/gallery/{LONGEST_ID}/image",
    }  # fmt: skip
    if explain:
        hit["explanation"] = _explanation(grid, matches).to_dict(matrices=False)
    return hit


def _serialised(k: int, hit: dict[str, Any], group_size: int | None = None) -> int:
    f, label = LONGEST_FLOAT, "\x01" * MAX_LABEL_LENGTH
    page: dict[str, Any] = {
        "results": [hit] * k * (group_size or 1), "offset": LONGEST_ID,
        "next_offset": LONGEST_ID, "structural_weight": f, "nothing_close": False,
        "ranked_by": f"re-ranked by structural matching (weight {f:g})",
    }  # fmt: skip
    if group_size is not None:
        page["groups"] = [{"label": label, "results": [hit] * group_size}] * k
    schema = SearchResponse if group_size else ExamplesResponse
    return len(
        schema.model_validate(page).model_dump_json(by_alias=True, exclude_unset=True).encode()
    )


@pytest.mark.parametrize("grid", [1, 2, 4, 7])
def test_the_estimates_bound_the_longest_answers(grid: int) -> None:
    """Worst cases serialised through the response models (longest floats and ids, keys and
    labels of escaped control characters at their length limits) stay within the estimate."""
    for matches, explain, text in itertools.product((0, 5, 256), (False, True), ("\x01", "é")):
        options = SearchOptions(k=3, matches=matches, explain=explain)
        hit = _hit(grid, min(matches, grid**4), explain, text)
        assert _serialised(3, hit) <= search_bytes(options, grid)
        grouped = SearchOptions(k=3, matches=matches, explain=explain, group_size=2)
        assert _serialised(3, hit, group_size=2) <= search_bytes(grouped, grid)
    for matches in (0, 5, 256):
        whole = _explanation(grid, min(matches, grid**4)).to_dict(matrices=True)
        written = json.dumps(whole, ensure_ascii=False, separators=(",", ":"))  # JSONResponse's
        assert len(written.encode()) <= explanation_bytes(grid, matches, matrices=True)


def test_the_readme_defaults_fit_comfortably() -> None:
    """A batch of 16 images, k=10, 5 matches, explanations on: 2.0 MB at worst for the default
    4 x 4 grid, 4.0 MB for 7 x 7, against 16 MB."""
    for grid in (4, 7):
        defaults = search_bytes(SearchOptions(k=10, matches=5), grid, queries=16)
        assert defaults < MAX_RESPONSE_BYTES / 3


def test_any_single_query_the_parameters_allow_fits_up_to_a_7_by_7_grid() -> None:
    """The budget refuses only several queries at once (batches): a single search within the
    parameters' own bounds fits (so that the schemathesis test's 'valid requests accepted'
    holds for single searches with no rule of its own for the budget)."""
    largest = [
        SearchOptions(k=1000, explain=False),
        SearchOptions(k=1000, explain=False, group_size=MAX_GROUPED_HITS // 1000),
        SearchOptions(k=1, explain=False, group_size=100),
        SearchOptions(k=MAX_EXPLAINED_HITS, matches=256),
        SearchOptions(k=MAX_EXPLAINED_HITS, matches=256, group_size=1),
        SearchOptions(k=1, matches=256, group_size=MAX_EXPLAINED_HITS),
    ]
    for options in largest:
        assert search_bytes(options, grid=7) <= MAX_RESPONSE_BYTES, options


def test_explanations_with_their_matrices_fit_but_for_very_fine_grids() -> None:
    """/explain sends the R x R matrices: any top fits up to a 23 x 23 grid; past it, refused."""
    check_explanation(grid=23, matches=256)
    with pytest.raises(ApiError) as refused:
        check_explanation(grid=24, matches=0)
    assert refused.value.status == 422
    assert "format=png" in refused.value.message


def test_a_batch_over_the_budget_is_refused_before_any_work(client: TestClient) -> None:
    """16 images x 1,000 hits: refused with 422 naming the limit and what fits, before a single
    upload is decoded (these are not even images)."""
    files = [("images", (f"q{i}.png", b"not an image")) for i in range(16)]
    params = {"k": 1000, "rerank_k": 1000, "explain": False}
    refused = client.post("/search/batch", files=files, params=params)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_request"
    assert f"{MAX_RESPONSE_BYTES / MB:.1f} MB" in error["message"]
    assert "k=" in error["message"]
    assert "images" in error["message"]


def test_the_finding_is_refused_and_what_fits_is_named() -> None:
    """The hostile request, for the default 4 x 4 grid: 16 images x 100 hits explained with
    256 matches each (a 602 MB answer): refused; each value named fits with the others."""
    options = SearchOptions(k=100, rerank_k=1000, matches=256)
    with pytest.raises(ApiError) as refused:
        check_search(options, grid=4, queries=16)
    message = refused.value.message
    assert refused.value.status == 422
    k, images = _named(message, "k="), int(message.split(" images")[0].split(" ")[-1])
    matches = _named(message, "matches=") if "matches=" in message else None
    check_search(dataclasses.replace(options, k=k), grid=4, queries=16)
    with pytest.raises(ApiError):
        check_search(dataclasses.replace(options, k=k + 1), grid=4, queries=16)
    check_search(options, grid=4, queries=images)
    if matches is not None:
        check_search(dataclasses.replace(options, matches=matches), grid=4, queries=16)
    assert "explain=false" in message
    check_search(dataclasses.replace(options, explain=False), grid=4, queries=16)


def _named(message: str, name: str) -> int:
    return int(message.split(name)[1].split(",")[0])


def test_the_largest_values_named_are_accepted(client: TestClient) -> None:
    files = [("images", (f"q{i}.png", png())) for i in range(16)]
    params: dict[str, Any] = {"k": 1000, "explain": False}
    message = client.post("/search/batch", files=files, params=params).json()["error"]["message"]
    k = int(message.split("k=")[1].split(",")[0])
    images = int(message.split(", ")[-1].split(" images")[0])
    answer = client.post("/search/batch", files=files, params={**params, "k": k})
    assert answer.status_code == 200, answer.text
    answer = client.post("/search/batch", files=files[:images], params=params)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["queries"]) == images


def test_a_slow_answer_stops_at_the_deadline(
    served: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the answer runs within the deadline: explanations that take 0.4 s each to
    write, 10 of them, under a 1.5 s deadline: 503 deadline_exceeded soon after it, and the
    writing stopped there (not all 10 written)."""
    written = []
    to_dict = Explanation.to_dict

    def slow(self: Explanation, matrices: bool = True) -> dict[str, Any]:
        written.append(1)
        time.sleep(0.4)
        return to_dict(self, matrices)

    app = create_app(settings_for(served, request_timeout_s=1.5), load_in_background=False)
    with TestClient(app) as client:
        assert client.post("/search/by-id/3", params={"k": 10}).status_code == 200  # warm
        monkeypatch.setattr(Explanation, "to_dict", slow)
        start = time.monotonic()
        late = client.post("/search/by-id/3", params={"k": 10})
        took = time.monotonic() - start
    assert late.status_code == 503, late.text
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert took < 2.5
    assert len(written) < 10
