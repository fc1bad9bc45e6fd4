"""The global term split over regions, against naive references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.attribution import (
    global_basis,
    global_contributions,
    pooling_cells,
)
from model.config import MatchingConfig, ModelConfig, Preprocessing
from model.explain import explain, ranking_rule, verdict_of, with_global_split
from model.matching import match_pairs
from model.network import Embedding, EmbeddingHead
from model.preprocessing import preprocess


@pytest.mark.parametrize(("grid", "size"), [(4, 7), (4, 8), (7, 7), (3, 10), (2, 5), (5, 3)])
def test_pooling_cells_are_adaptive_pooling_shared_out(grid: int, size: int) -> None:
    cells = pooling_cells(grid, size, size + 1)
    torch.testing.assert_close(cells.sum(dim=0), torch.ones(size * (size + 1), dtype=cells.dtype))
    # A cell's positions, weighted equally, give adaptive average pooling's cell mean.
    x = torch.randn(1, 3, size, size + 1, dtype=torch.float64)
    member = (cells > 0).double()
    means = (x.flatten(2) @ member.T) / member.sum(dim=1)
    pooled = F.adaptive_avg_pool2d(x, grid).flatten(2)
    torch.testing.assert_close(means, pooled)


def test_global_contributions_match_a_loop_and_sum_to_the_cosine() -> None:
    maps = torch.randn(3, 8, 5, 6)
    other = F.normalize(torch.randn(3, 8), dim=-1)
    grid, (h, w) = 4, maps.shape[2:]
    got = global_contributions(maps, other, grid)
    assert got.shape == (3, 16)

    def cells_of(y: int, x: int) -> list[int]:  # adaptive pooling's cells holding (y, x)
        rows = [i for i in range(grid) if (i * h) // grid <= y < math.ceil((i + 1) * h / grid)]
        cols = [j for j in range(grid) if (j * w) // grid <= x < math.ceil((j + 1) * w / grid)]
        return [i * grid + j for i in rows for j in cols]

    for b in range(3):
        f = maps[b].double()  # (D, h, w)
        mean = f.mean(dim=(1, 2))
        expected = [0.0] * (grid * grid)
        for y in range(h):
            for x in range(w):
                share = float(f[:, y, x] @ other[b].double()) / (h * w * float(mean.norm()))
                for c in cells_of(y, x):
                    expected[c] += share / len(cells_of(y, x))
        torch.testing.assert_close(got[b], torch.tensor(expected, dtype=torch.float64))
        cosine = float(F.normalize(mean, dim=0) @ other[b].double())
        assert float(got[b].sum()) == pytest.approx(cosine, abs=1e-12)
    # The basis sums over the cells to the unit global vector.
    basis = global_basis(maps, grid=4)
    assert basis.shape == (3, 16, 8)
    torch.testing.assert_close(
        basis.sum(dim=1), F.normalize(maps.double().mean(dim=(2, 3)), dim=-1)
    )


def test_global_basis_checks_shapes() -> None:
    with pytest.raises(ValueError, match=r"maps \(B, D, h, w\)"):
        global_basis(torch.randn(2, 8, 5), grid=4)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_whole_score_is_explained_for_a_head_with_bias(weight: float) -> None:
    """A projecting head (with a bias, so not linear in the backbone's features) over a 7 x 7
    map pooled into overlapping 4 x 4 cells: each term's lists and the totals add up."""
    torch.manual_seed(0)
    head = EmbeddingHead(in_channels=12, dim=6, grid=4)
    with torch.no_grad():
        head.proj.bias.fill_(0.3)
        e2 = head(torch.randn(2, 12, 7, 7), keep_maps=True)
    assert e2.maps is not None
    assert e2.maps.shape == (2, 6, 7, 7)
    a, b = e2[0], e2[1]
    matching = MatchingConfig(structural_weight=weight).with_bands(0.2, 0.5)
    match = match_pairs(a, b, matching)
    _, geometry = preprocess(Image.new("RGB", (300, 200)), Preprocessing())
    bases = (global_basis(a.maps, 4)[0], global_basis(b.maps, 4)[0])
    e = explain(match, geometry, geometry, 4, matching, bases=bases,
                vectors=(a.vector[0], b.vector[0]))  # fmt: skip
    assert e.exact
    for side in (e.query, e.result):
        assert side.global_ is not None
        assert sum(side.global_) == pytest.approx(e.global_similarity, abs=1e-6)
        assert sum(side.structural) == pytest.approx(e.structural_similarity, abs=1e-6)
        assert sum(side.total) == pytest.approx(e.score, abs=1e-6)
        assert abs(side.residual) < 1e-6
        expected = [g + weight * s for g, s in zip(side.global_, side.structural, strict=True)]
        assert side.total == pytest.approx(expected, abs=1e-12)
    assert e.verdict == verdict_of(e.score, matching)
    # The query side's split is that of its own map against the result's vector.
    reference = global_contributions(a.maps, b.vector, 4)[0].tolist()
    assert e.query.global_ == pytest.approx(reference, abs=1e-12)


def test_a_side_without_its_map_reports_what_it_leaves_out() -> None:
    head = EmbeddingHead(in_channels=12, dim=None, grid=4)
    e2 = head(torch.randn(2, 12, 7, 7), keep_maps=True)
    a, b = e2[0], e2[1]
    matching = MatchingConfig(structural_weight=0.0)
    match = match_pairs(a, b, matching)
    _, geometry = preprocess(Image.new("RGB", (64, 64)), Preprocessing())
    bare = explain(match, geometry, geometry, 4, matching)
    assert bare.verdict is None  # no bands: no verdict
    half = with_global_split(bare, (global_basis(a.maps, 4)[0], None), (a.vector[0], b.vector[0]))
    assert not half.exact
    assert half.result.global_ is None
    assert half.result.residual == pytest.approx(half.global_similarity, abs=1e-6)
    assert abs(half.query.residual) < 1e-6


def test_verdicts_and_words() -> None:
    bands = MatchingConfig().with_bands(0.5, 0.8)
    assert [verdict_of(s, bands) for s in (0.9, 0.8, 0.79, 0.5, 0.1)] == [
        "close", "close", "related", "related", "unrelated",
    ]  # fmt: skip
    assert verdict_of(0.9, MatchingConfig()) is None
    assert ranking_rule(0.0) == "ranked by global similarity"
    assert ranking_rule(0.25) == "re-ranked by structural matching (weight 0.25)"
    with pytest.raises(ValueError, match="related_score"):
        MatchingConfig().with_bands(0.9, 0.5)
    with pytest.raises(ValueError, match="together"):
        MatchingConfig(close_score=0.5)


def test_embedding_keeps_maps_through_slicing_and_concatenation() -> None:
    head = EmbeddingHead(in_channels=4, dim=3, grid=2)
    e = head(torch.randn(3, 4, 5, 5), keep_maps=True)
    tail, head_item = e[1:].maps, e[0].maps
    assert tail is not None
    assert tail.shape == (2, 3, 5, 5)
    assert head_item is not None
    assert head_item.shape == (1, 3, 5, 5)
    assert Embedding.cat([e, e]).maps is not None
    assert Embedding.cat([e, e.without_maps()]).maps is None
    with pytest.raises(ValueError, match="maps"):
        Embedding(e.parts, e.vector, torch.randn(3, 2, 5, 5))
    assert ModelConfig().regions == 16
