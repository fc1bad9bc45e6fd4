"""The cached neighbour graph of ``index_builder.duplicates`` against the first, exhaustive way of
finding near-copies (tests/index_builder/duplicates_reference.py), on a small gallery of
clustered random vectors and grids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from index_builder import duplicates
from index_builder.duplicate_groups import DuplicateGroups
from index_builder.duplicates import (
    NeighbourGraph,
    match_graph,
    near_duplicates,
    neighbour_graph,
    stored_embedding,
)
from model.config import MatchingConfig
from model.matching import match_pairs
from tests.index_builder.duplicates_reference import MemoryGallery, clustered, exhaustive_groups

# A fixed number of Sinkhorn iterations: a pair's similarity is then the same whatever batch
# it is matched in (the early stop looks at the whole batch), so groups compare exactly.
MATCHING = MatchingConfig(max_iter=30, tol=0.0)
NEIGHBOURS = 5  # fewer than a cluster's reach, so that the nearest-neighbour cut matters
THRESHOLDS = [(-1.0, -1.0), (0.0, 0.5), (0.5, 0.3), (0.7, 0.6), (0.8, 0.7), (0.9, 0.8), (1.0, 0.0)]


def as_tuples(groups: DuplicateGroups) -> list[tuple[list[int], list[tuple[int, int]]]]:
    return [(g.ids, [(p.a, p.b) for p in g.pairs]) for g in groups.page(0, len(groups))]


def matched_down_to(graph: NeighbourGraph, index: Any, threshold: float) -> NeighbourGraph:
    for matched in match_graph(graph, index, MATCHING, threshold):
        graph = matched
    return graph


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of pairs of each structural match duplicates makes."""
    calls: list[int] = []

    def counting(a: Any, b: Any, config: Any) -> Any:
        calls.append(len(a))
        return match_pairs(a, b, config)

    monkeypatch.setattr(duplicates, "match_pairs", counting)
    return calls


def test_the_graph_gives_the_groups_of_matching_every_proposed_pair_afresh(
    counted: list[int],
) -> None:
    gallery = MemoryGallery(*clustered(photos=30, copies=4, seed=1))
    graph = neighbour_graph(gallery, NEIGHBOURS)
    sizes = []
    for threshold, structural in sorted(THRESHOLDS, reverse=True):  # lower and lower
        graph = matched_down_to(graph, gallery, threshold)
        got = as_tuples(graph.groups(threshold, structural))
        assert got == exhaustive_groups(gallery, MATCHING, threshold, structural, NEIGHBOURS)
        sizes.append(len(got))
    assert len(set(sizes)) >= 4  # the thresholds cut the gallery in different ways
    # Each pair was matched once, however many thresholds asked for it.
    assert sum(counted) == len(graph.a) == len(np.unique(np.c_[graph.a, graph.b], axis=0))
    # Going back up costs no match, and the similarities are those of the reference.
    before = sum(counted)
    for threshold, structural in THRESHOLDS:
        graph.groups(threshold, structural)
    assert sum(counted) == before
    with torch.inference_mode():
        fresh = match_pairs(stored_embedding(gallery, graph.a), stored_embedding(gallery, graph.b),
                            MATCHING)  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(graph.structural_similarity),
                               fresh.structural_similarity[:, 0])  # fmt: skip


def test_after_adds_and_removes_only_new_pairs_are_matched(counted: list[int]) -> None:
    gallery = MemoryGallery(*clustered(photos=20, copies=4, seed=2))
    graph = matched_down_to(neighbour_graph(gallery, NEIGHBOURS, version=0), gallery, 0.5)
    known = {(int(x), int(y)) for x, y in zip(graph.a, graph.b, strict=True)}
    vectors, grids = clustered(photos=3, copies=4, seed=3)
    added = gallery.add(vectors, grids)
    gallery.remove([0, 1, 2, 40])
    counted.clear()
    graph = neighbour_graph(gallery, NEIGHBOURS, version=1, known=graph)
    assert graph.version == 1
    graph = matched_down_to(graph, gallery, 0.5)
    proposed = (graph.found >= 0.5).nonzero()[0]
    new = [i for i in proposed if (graph.a[i], graph.b[i]) not in known]
    assert sum(counted) == len(new) > 0
    assert any(graph.b[i] in added for i in new)
    assert not np.isin(np.r_[graph.a, graph.b], [0, 1, 2, 40]).any()
    for threshold, structural in [(0.5, 0.3), (0.8, 0.7)]:
        got = as_tuples(graph.groups(threshold, structural))
        assert got == exhaustive_groups(gallery, MATCHING, threshold, structural, NEIGHBOURS)


def test_a_match_cut_short_keeps_the_most_similar_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    gallery = MemoryGallery(*clustered(photos=10, copies=4, seed=4))
    graph = neighbour_graph(gallery, NEIGHBOURS)
    monkeypatch.setattr(duplicates, "BATCH", 7)
    batches = match_graph(graph, gallery, MATCHING, -1.0)
    first = next(batches)
    assert np.count_nonzero(~np.isnan(first.structural_similarity)) == 7
    seventh = np.sort(graph.found)[::-1][6]
    assert first.answers(float(seventh) + 1e-6)
    assert not first.answers(-1.0)
    with pytest.raises(ValueError, match="match the graph"):
        first.groups(-1.0, 0.0)


def test_a_page_cuts_large_groups_and_says_how_large_they_are() -> None:
    a, b = np.arange(0, 9), np.arange(1, 10)  # one chain of 10 items, 9 pairs
    structural = np.linspace(0.1, 0.9, 9).astype(np.float32)
    groups = DuplicateGroups.of(np.r_[a, 20], np.r_[b, 21], np.r_[structural, 1.0],
                                np.r_[structural, 1.0])  # fmt: skip
    big, small = groups.page(0, 5, most_items=3, most_pairs=2)
    assert (big.ids, big.size, big.pair_count) == ([0, 1, 2], 10, 9)
    assert [(p.a, p.b) for p in big.pairs] == [(8, 9), (7, 8)]
    assert (small.ids, small.size, small.pair_count) == ([20, 21], 2, 1)
    assert groups.page(1, 1) == [small]
    assert groups.page(5, 3) == []


def test_an_empty_gallery_has_no_groups() -> None:
    gallery = MemoryGallery(np.zeros((0, 16), np.float32), np.zeros((0, 4, 16), np.float16))
    assert near_duplicates(gallery, MATCHING) == []
    one = MemoryGallery(*clustered(photos=1, copies=1, seed=5))
    assert near_duplicates(one, MATCHING, threshold=-1.0, structural_threshold=-1.0) == []
