"""The explanation picture: its size, its words, its tables and its labels."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import MatchingConfig, ModelConfig, Preprocessing
from model.explain import Explanation
from model.network import Embedding
from model.pipeline import explain_embeddings
from model.preprocessing import preprocess
from model.render import (
    HEIGHT,
    heading,
    intersects,
    place_labels,
    render_explanation,
    score_rows,
)

QUERY = Image.new("RGB", (400, 300), "white")
RESULT = Image.new("RGB", (300, 500), "white")


def _embedding(seed: int, grid: int, dim: int = 24) -> Embedding:
    """One image's embedding with its projected map kept, so that the global term splits."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(1, dim, 8, 8, generator=generator) + 0.5
    parts = torch.nn.functional.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)
    return Embedding(
        torch.nn.functional.normalize(parts, dim=-1),
        torch.nn.functional.normalize(maps.mean((2, 3)), dim=-1),
        maps,
    )


def _explanation(
    weight: float = 0.0,
    top: int = 5,
    grid: int = 4,
    bands: tuple[float, float] | None = (0.2, 0.6),
    maps: bool = True,
) -> Explanation:
    matching = MatchingConfig(structural_weight=weight)
    if bands is not None:
        matching = matching.with_bands(*bands)
    config = ModelConfig(dim=24, grid=grid, matching=matching)
    _, gq = preprocess(QUERY, Preprocessing())
    _, gr = preprocess(RESULT, Preprocessing())
    a, b = _embedding(1, grid), _embedding(2, grid)
    if not maps:  # a stored item whose picture is gone: no map, no global split
        b = Embedding(b.parts, b.vector)
    return explain_embeddings(a, gq, b, gr, config, top=top)


def _pairwise_apart(boxes: list[tuple[float, float, float, float]]) -> None:
    for a, b in itertools.combinations(boxes, 2):
        assert not intersects(a, b), (a, b)


def test_the_picture_has_both_images_side_by_side_at_the_expected_size() -> None:
    e = _explanation()
    picture = render_explanation(QUERY, RESULT, e)
    assert picture.mode == "RGB"
    # Both images scaled to HEIGHT px high: 400 x 300 -> 427 wide, 300 x 500 -> 192 wide.
    assert picture.width >= 427 + 192 + 2 * 12
    assert picture.height > HEIGHT + 100
    # The heat map tints the white images: the query's cells are no longer all white.
    pixels = np.asarray(picture.convert("L"))
    assert pixels[100 : 100 + HEIGHT - 40, 20:420].min() < 250


def test_heights_scale_the_regions_of_reduced_copies() -> None:
    """A copy half the size, with the original heights given, is drawn the same size."""
    e = _explanation()
    full = render_explanation(QUERY, RESULT, e)
    small = render_explanation(
        QUERY.resize((200, 150)), RESULT.resize((150, 250)), e, heights=(300, 500)
    )
    assert small.size == full.size
    assert small.info["labels"] == full.info["labels"]


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_the_score_rows_add_up_to_the_score(weight: float) -> None:
    e = _explanation(weight=weight)
    rows = score_rows(e)
    assert sum(r.total for r in rows) == pytest.approx(e.score, abs=1e-12)
    assert [r.name.split(" ")[0] for r in rows[:5]] == [
        str(r) for r in sorted(range(16), key=lambda r: -e.query.total[r])[:5]
    ]
    assert rows[-1].name == "other 11 parts"
    global_ = sum(r.global_ or 0.0 for r in rows)
    structural = sum(r.structural or 0.0 for r in rows)
    assert global_ == pytest.approx(e.global_similarity, abs=1e-6)
    assert structural == pytest.approx(weight * e.structural_similarity, abs=1e-6)
    picture = render_explanation(QUERY, RESULT, e)
    assert picture.info["score_rows"] == rows


def test_a_side_without_its_map_gets_a_row_for_what_is_not_split() -> None:
    e = _explanation(weight=0.5)
    stored = _explanation(weight=0.5, maps=False)
    assert stored.exact is False
    rows = score_rows(stored)  # the query side is split: its rows add up
    assert sum(r.total for r in rows) == pytest.approx(stored.score, abs=1e-12)
    assert e.query.total == pytest.approx(stored.query.total)
    # Without the query's map the residual is real, and shown as its own row.
    flipped = dataclasses.replace(stored, query=stored.result, result=stored.query)
    rows = score_rows(flipped)
    assert rows[-1].name == "not split over parts"
    assert sum(r.total for r in rows) == pytest.approx(flipped.score, abs=1e-12)
    render_explanation(QUERY, RESULT, flipped)  # draws, with the unexplained part named


def test_the_heading_says_what_ranked_the_result() -> None:
    plain = heading(_explanation(weight=0.0))
    assert plain[0] == "Verdict: close  |  Ranked by global similarity"
    assert "does not rank here (weight 0)" in plain[1]
    assert plain[2].startswith("score ")
    assert " + 0 x structural " in plain[2]
    weighted = heading(_explanation(weight=0.5, bands=None))
    assert weighted[0] == "Re-ranked by structural matching (weight 0.5)"
    assert "adds 0.5 x the structural similarity" in weighted[1]
    unrelated = heading(_explanation(weight=0.5, bands=(5.0, 6.0)))
    assert unrelated[0].startswith("Verdict: unrelated")


def test_place_labels_never_overlaps_and_leaves_out_what_does_not_fit() -> None:
    # Ten labels all wanting the same spot, with two fallbacks each: three fit, the rest not.
    spots = [[(50.0, 50.0), (50.0, 70.0), (50.0, 90.0)]] * 10
    placed = place_labels(spots, [(40.0, 16.0)] * 10, bounds=(0, 0, 200, 200))
    kept = [b for b in placed if b is not None]
    assert len(kept) == 3
    assert placed[0] == (30.0, 42.0, 70.0, 58.0)  # the first takes its first choice
    _pairwise_apart(kept)
    # Boxes leaving the bounds or meeting a box already taken are refused.
    placed = place_labels(
        [[(5.0, 5.0), (100.0, 100.0)], [(100.0, 100.0), (150.0, 150.0)]],
        [(20.0, 20.0), (20.0, 20.0)],
        bounds=(0, 0, 200, 200),
        taken=[(0.0, 0.0, 10.0, 10.0)],
    )
    assert placed == [(90.0, 90.0, 110.0, 110.0), (140.0, 140.0, 160.0, 160.0)]


@pytest.mark.parametrize(("grid", "top"), [(4, 16), (2, 16), (4, 40)])
def test_no_two_labels_in_a_busy_picture_overlap(grid: int, top: int) -> None:
    """Many lines meeting at the same parts: every text written (heading, captions, legend,
    tables, part tags, line numbers) keeps clear of every other."""
    e = _explanation(weight=0.5, top=top, grid=grid)
    assert len(e.matches) == min(top, grid**4)
    picture = render_explanation(QUERY, RESULT, e, top=top)
    boxes = picture.info["labels"]
    assert len(boxes) > 30
    _pairwise_apart(boxes)
    for box in boxes:  # and all of it on the picture
        assert 0 <= box[0] <= box[2] <= picture.width
        assert 0 <= box[1] <= box[3] <= picture.height


def test_rendering_is_fast() -> None:
    import time

    e = _explanation(weight=0.5, top=16)
    started = time.perf_counter()
    render_explanation(QUERY, RESULT, e, top=16)
    assert time.perf_counter() - started < 1.0
