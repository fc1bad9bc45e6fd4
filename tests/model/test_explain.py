from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import MatchingConfig, Preprocessing
from model.explain import explain
from model.matching import match_all
from model.network import Embedding
from model.preprocessing import preprocess
from model.render import render_explanation

MATCHING = MatchingConfig()


def _embedding(n: int) -> Embedding:
    raw = torch.randn(n, 16, 32)
    return Embedding(
        torch.nn.functional.normalize(raw, dim=-1),
        torch.nn.functional.normalize(raw.mean(1), dim=-1),
    )


@pytest.fixture
def case() -> tuple:
    query, gallery = _embedding(2), _embedding(3)
    match = match_all(query, gallery)
    _, gq = preprocess(Image.new("RGB", (400, 300)), Preprocessing())
    _, gr = preprocess(Image.new("RGB", (300, 500)), Preprocessing())
    return match, gq, gr


def test_invariants(case: tuple) -> None:
    match, gq, gr = case
    e = explain(match, gq, gr, grid=4, matching=MATCHING, index=(1, 2), top=5)
    assert sum(e.query_contributions) == pytest.approx(e.structural_similarity, abs=1e-5)
    assert sum(e.result_contributions) == pytest.approx(e.structural_similarity, abs=1e-5)
    assert e.score == pytest.approx(e.structural_similarity + e.global_similarity, abs=1e-12)
    assert e.structural_similarity == pytest.approx(
        float(match.structural_similarity[1, 2]), abs=1e-5
    )
    assert e.global_similarity == pytest.approx(float(match.global_similarity[1, 2]), abs=1e-7)
    assert sum(e.query_weights) == pytest.approx(1.0, abs=1e-5)
    contributions = [m.contribution for m in e.matches]
    assert contributions == sorted(contributions, reverse=True)
    assert len(e.matches) == 5
    best = e.matches[0]
    assert best.contribution == pytest.approx(best.flow * best.similarity, rel=1e-9)
    assert best.flow == pytest.approx(e.plan[best.query_region][best.result_region])


def test_regions_are_in_each_images_own_pixels(case: tuple) -> None:
    match, gq, gr = case
    e = explain(match, gq, gr, grid=4, matching=MATCHING)
    assert len(e.query_regions) == 16
    x0 = min(b[0] for b in e.query_regions)
    x1 = max(b[2] for b in e.query_regions)
    y1 = max(b[3] for b in e.query_regions)
    # 400 x 300 -> resized 341 x 256 -> crop 224 at (58, 16): in the original, a square of side
    # 224 * 300 / 256 = 262.5 from x = 58 * 400 / 341, y = 16 * 300 / 256 = 18.75.
    left = 58 * 400 / 341
    assert (x0, x1, y1) == pytest.approx((left, left + 262.5, 18.75 + 262.5), abs=0.01)
    # 300 x 500 (portrait): the square crop spans the middle of the width, 18.75 .. 281.25.
    assert min(b[0] for b in e.result_regions) == pytest.approx(18.75, abs=0.01)
    assert max(b[2] for b in e.result_regions) == pytest.approx(281.25, abs=0.5)


def test_json_form_has_the_documented_keys(case: tuple) -> None:
    match, gq, gr = case
    data = json.loads(json.dumps(explain(match, gq, gr, grid=4, matching=MATCHING).to_dict()))
    for key in (
        "epsilon", "grid", "plan", "similarity", "query_weights", "result_weights",
        "query_regions", "result_regions", "contributions", "matches",
        "global_similarity", "structural_similarity", "score",
    ):  # fmt: skip
        assert key in data
    assert len(data["plan"]) == 16
    assert len(data["plan"][0]) == 16
    assert set(data["contributions"]) == {"global", "structural", "total", "residual", "exact"}
    for term in ("global", "structural", "total"):
        assert set(data["contributions"][term]) == {"query", "result"}
    # Without maps the global term is not split: the totals leave it as each side's residual.
    assert data["contributions"]["global"] == {"query": None, "result": None}
    assert data["contributions"]["exact"] is False
    for side in ("query", "result"):
        assert data["contributions"]["residual"][side] == pytest.approx(
            data["global_similarity"], abs=1e-6
        )
    assert data["ranked_by"] == "re-ranked by structural matching (weight 1)"
    assert set(data["matches"][0]) == {
        "query_region", "result_region", "flow", "similarity", "contribution",
    }  # fmt: skip
    small = explain(match, gq, gr, grid=4, matching=MATCHING).to_dict(matrices=False)
    assert "plan" not in small
    assert "similarity" not in small


def test_rendering_draws_both_images(case: tuple) -> None:
    match, gq, gr = case
    e = explain(match, gq, gr, grid=4, matching=MATCHING)
    picture = render_explanation(
        Image.new("RGB", (400, 300), "white"), Image.new("RGB", (300, 500), "white"), e
    )
    assert picture.mode == "RGB"
    assert picture.width > 400 + 192  # both images scaled to 320 px high, side by side
    # The heatmap tints cells: some pixels of the white query are no longer white.
    assert np.asarray(picture.crop((20, 60, 400, 300)).convert("L")).min() < 250
