"""Near-duplicates in a gallery: crops, mirrors, rescales and re-encodings of one picture.

Two items are near-copies when their global vectors are close (``global >= threshold``, found
by a k-nearest-neighbour search of every item against the index) and their part grids confirm
it (``structural >= structural_threshold``, the optimal-transport match of
:func:`model.matching.match_pairs`): a re-encoded or rescaled copy keeps both, while two
different photographs of one kind of thing are close globally but match part by part less
well. Groups are the connected components of the confirmed pairs. The default thresholds are
measured by ``bench/bench_duplicates.py`` (near-copies made from photos of the CUB validation
classes against other photos of the same species).

The work is kept in a :class:`NeighbourGraph`, so that asking again with other thresholds costs
milliseconds, not a new search and match: :func:`neighbour_graph` records the pairs that each
item makes with its ``neighbours`` nearest items (with what an earlier graph of the gallery had
matched, so that after an add only the new pairs are matched); :func:`match_graph` matches the
pairs whose global score reaches a threshold, most similar first, each pair once; and
:meth:`NeighbourGraph.groups` keeps the pairs above both thresholds and joins them. For every pair
of thresholds the groups are those that matching every proposed pair afresh would give.

The index is read a batch at a time inside ``hold()``, the caller's lock: the matching runs
outside it, so that a service goes on answering reads meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from index_builder.duplicate_groups import DuplicateGroup, DuplicateGroups
from model.config import MatchingConfig
from model.matching import match_pairs
from model.network import Embedding

GLOBAL_THRESHOLD = 0.8
STRUCTURAL_THRESHOLD = 0.7
NEIGHBOURS = 16
BATCH = 256  # pairs matched together; their grids are read in one hold of the caller's lock
SEARCH_WORK = 2**20  # query x item products of one search batch, so that a hold stays short

Check = Callable[[], object] | None
Hold = Callable[[], AbstractContextManager[object]]


class GalleryReads(Protocol):
    """What finding duplicates reads from an index (a GalleryIndex or a QdrantIndex)."""

    @property
    def ids(self) -> np.ndarray: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def vectors(self, ids: np.ndarray) -> np.ndarray: ...

    def grids(self, ids: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class NeighbourGraph:
    """The pairs that every item makes with its nearest items, for one version of a gallery.

    a, b: (P,) int64 item ids, ``a < b``, each pair once, in (a, b) order; found: (P,) float32,
    the index's score of the pair (the larger of the two directions it was found in);
    global_similarity, structural_similarity: (P,) float32, NaN until the pair is matched.
    ``version`` names the gallery's version (the caller's value, compared for equality).
    Immutable: matching more pairs makes a new graph, so that readers never see one half-made.
    """

    version: Hashable
    a: np.ndarray
    b: np.ndarray
    found: np.ndarray
    global_similarity: np.ndarray
    structural_similarity: np.ndarray

    def unmatched(self, threshold: float) -> np.ndarray:
        """Positions of the pairs proposed at ``threshold`` and not matched yet, most similar
        first (so that a match cut short leaves the higher thresholds answered)."""
        todo = np.flatnonzero((self.found >= threshold) & np.isnan(self.structural_similarity))
        return todo[np.argsort(-self.found[todo], kind="stable")]

    def answers(self, threshold: float) -> bool:
        """Whether every pair that ``threshold`` proposes is matched."""
        return not np.any((self.found >= threshold) & np.isnan(self.structural_similarity))

    def groups(self, threshold: float, structural_threshold: float) -> DuplicateGroups:
        """The groups of near-copies at these thresholds; ValueError when some pair proposed at
        ``threshold`` is not matched yet (:func:`match_graph` first)."""
        if not self.answers(threshold):
            raise ValueError(f"match the graph down to {threshold} before grouping at it")
        keep = (
            (self.found >= threshold)
            & (self.global_similarity >= threshold)
            & (self.structural_similarity >= structural_threshold)
        )
        return DuplicateGroups.of(self.a[keep], self.b[keep], self.global_similarity[keep],
                                  self.structural_similarity[keep])  # fmt: skip


def neighbour_graph(
    index: GalleryReads,
    neighbours: int = NEIGHBOURS,
    version: Hashable = None,
    known: NeighbourGraph | None = None,
    hold: Hold = contextlib.nullcontext,
    check: Check = None,
) -> NeighbourGraph:
    """Each item of ``index`` searched for its ``neighbours`` nearest items: the pairs they make,
    none matched but those ``known`` had matched (an earlier graph of the same gallery: an item
    id always names the same picture). The lock ``hold`` is taken for each batch of searches;
    ``check`` is called between batches (a deadline that raises to stop)."""
    with hold():
        ids = np.array(index.ids, dtype=np.int64)
    step = max(1, min(BATCH, SEARCH_WORK // max(len(ids), 1)))
    found_a, found_b, scores = [], [], []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        with hold():
            score, found = index.search(index.vectors(chunk), neighbours + 1)
        rows, cols = np.nonzero((found >= 0) & (found != chunk[:, None]))
        found_a.append(np.minimum(chunk[rows], found[rows, cols]))
        found_b.append(np.maximum(chunk[rows], found[rows, cols]))
        scores.append(score[rows, cols].astype(np.float32))
        if check is not None:
            check()
    a, b = _concat(found_a), _concat(found_b)
    pairs, inverse = _unique_rows(a, b)
    best = np.full(len(pairs), -np.inf, dtype=np.float32)
    np.maximum.at(best, inverse, _concat(scores, np.float32))
    nan = np.full(len(pairs), np.nan, dtype=np.float32)
    graph = NeighbourGraph(version, pairs[:, 0], pairs[:, 1], best, nan, nan.copy())
    return graph if known is None else _carry_over(known, graph)


def match_graph(
    graph: NeighbourGraph,
    index: GalleryReads,
    matching: MatchingConfig,
    threshold: float,
    hold: Hold = contextlib.nullcontext,
    check: Check = None,
    device: torch.device | str = "cpu",
) -> Iterator[NeighbourGraph]:
    """Match the pairs of ``graph`` that ``threshold`` proposes and are not matched yet, a batch
    at a time (most similar first), yielding the graph after each batch so that a caller cut
    short keeps what was done. Grids are read inside ``hold()``, matched outside it on
    ``device``; ``check`` is called after each batch."""
    todo = graph.unmatched(threshold)
    for start in range(0, len(todo), BATCH):
        at = todo[start : start + BATCH]
        with hold():
            read = _read_pairs(index, graph.a[at], graph.b[at])
        left, right = _pair_embeddings(*read)
        with torch.inference_mode():
            match = match_pairs(left.to(device), right.to(device), matching)
        global_sim = graph.global_similarity.copy()
        structural = graph.structural_similarity.copy()
        global_sim[at] = match.global_similarity[:, 0].cpu().numpy()
        structural[at] = match.structural_similarity[:, 0].cpu().numpy()
        graph = dataclasses.replace(graph, global_similarity=global_sim,
                                    structural_similarity=structural)  # fmt: skip
        yield graph
        if check is not None:
            check()


def near_duplicates(
    index: GalleryReads,
    matching: MatchingConfig,
    threshold: float = GLOBAL_THRESHOLD,
    structural_threshold: float = STRUCTURAL_THRESHOLD,
    neighbours: int = NEIGHBOURS,
    check: Check = None,
) -> list[DuplicateGroup]:
    """Every group of near-copies in ``index``, largest first (then by smallest id), whole.

    ``neighbours``: how many nearest items of each item are looked at (a larger group is
    still found whole when its members are linked through each other). ``check`` is called
    between batches (a deadline that raises to stop).
    """
    graph = neighbour_graph(index, neighbours, check=check)
    for matched in match_graph(graph, index, matching, threshold, check=check):
        graph = matched
    groups = graph.groups(threshold, structural_threshold)
    return groups.page(0, len(groups))


def stored_embedding(index: GalleryReads, ids: np.ndarray) -> Embedding:
    """The stored parts (as float32) and global vectors of the items ``ids``."""
    grids = torch.from_numpy(index.grids(ids).astype(np.float32))
    return Embedding(grids, torch.from_numpy(index.vectors(ids)))


def _read_pairs(
    index: GalleryReads, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What matching the pairs (a, b) of (n,) ids needs, each item read once: the grids (m, R, D)
    float16 and vectors (m, D) of the m distinct items, and (2n,) where each side's items are
    among them (a's, then b's)."""
    ids, inverse = np.unique(np.r_[a, b], return_inverse=True)
    return index.grids(ids), index.vectors(ids), inverse.reshape(-1)


def _pair_embeddings(
    grids: np.ndarray, vectors: np.ndarray, inverse: np.ndarray
) -> tuple[Embedding, Embedding]:
    """Both sides of the pairs read by :func:`_read_pairs`, grids as float32."""
    at = torch.from_numpy(inverse)
    stored = Embedding(torch.from_numpy(grids)[at].float(), torch.from_numpy(vectors)[at])
    half = len(inverse) // 2
    return stored[:half], stored[half:]


def _carry_over(known: NeighbourGraph, graph: NeighbourGraph) -> NeighbourGraph:
    """``graph`` with the similarities ``known`` has for the pairs the two share."""
    rows, inverse = _unique_rows(np.r_[known.a, graph.a], np.r_[known.b, graph.b])
    slot = np.full(len(rows), -1, dtype=np.int64)
    slot[inverse[: len(known.a)]] = np.arange(len(known.a))
    old = slot[inverse[len(known.a) :]]
    shared = old >= 0
    global_sim, structural = graph.global_similarity.copy(), graph.structural_similarity.copy()
    global_sim[shared] = known.global_similarity[old[shared]]
    structural[shared] = known.structural_similarity[old[shared]]
    return dataclasses.replace(graph, global_similarity=global_sim,
                               structural_similarity=structural)  # fmt: skip


def _unique_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (a, b) of (n,) int64, as (P, 2) in (a, b) order, and (n,) where each
    pair is among them."""
    rows = np.stack([a.astype(np.int64), b.astype(np.int64)], 1)
    if len(rows) == 0:
        return rows, np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    return unique, inverse.reshape(-1)


def _concat(parts: list[np.ndarray], dtype: type = np.int64) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
