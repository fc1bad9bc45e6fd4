"""The values a search passes between its stages, and its first stages after embedding:

    coarse_search  -> Candidates       each query's global ranking, by its global vector
    gather         -> Gathered         the stored grids and vectors of the positions it needs
    rerank         -> StructuralMatch  one structural match for every query of a batch

The ordering and explaining stages are :mod:`service.ranking`'s; the searches that run them
all, :mod:`service.searching`'s. The stages are plain functions of their inputs: they know no
HTTP, no lock and no timer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from index_builder import Item, LabelFilter
from index_builder.device_search import DeviceSearch
from index_builder.opening import AnyIndex
from model import Embedding, Explanation, structural_match
from model.config import ModelConfig
from model.matching import StructuralMatch

# (vectors (B, D), k, filter) -> (scores, ids), both (B, <= k), ids -1 past the end
SearchFunction = Callable[[np.ndarray, int, LabelFilter | None], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SearchOptions:
    """k results from position ``offset`` of one ranking, among the items ``where`` allows;
    hits that score below ``min_score`` left out; explanations with the ``matches`` strongest
    part pairs when ``explain``.

    ``rerank_k``, in every search: each query's first ``rerank_k`` candidates by the global
    vector are ordered by the score, ``global + w x structural``
    (:func:`model.matching.rerank_positions`); those hits are ``reranked``. A search by one
    query appends the rest of its global ranking, in global order (0: the global ranking
    alone); a search by examples ranks the union of its positives' first ``max(rerank_k, 1)``
    and nothing past them, having no single global order to append. With w = 0 the score is
    the global similarity: a search by query keeps the global order and matches no head.
    """

    k: int = 10
    rerank_k: int = 100
    explain: bool = True
    matches: int = 5
    offset: int = 0
    min_score: float | None = None
    where: LabelFilter = field(default_factory=LabelFilter)
    group_size: int | None = None  # group by label: k groups of up to this many hits


@dataclass(frozen=True)
class Hit:
    """One search result: the item, its score and its terms, where it stood in the global
    ranking (1-based), whether it was re-ranked, and its explanation when one was asked for."""

    item: Item
    score: float
    global_similarity: float
    structural_similarity: float
    reranked: bool
    global_rank: int
    explanation: Explanation | None = None
    positive: int | None = None  # example searches: the positive it matches best
    # The score of the hit's own pair (the query, or that positive, and the item): what its
    # verdict judges. An example search's ``score`` combines several pairs.
    pair_score: float | None = None


@dataclass(frozen=True)
class Page:
    """The hits of one query from ``offset``; ``next_offset`` continues the same ranking (None
    when it has no more items)."""

    hits: list[Hit]
    offset: int
    next_offset: int | None
    # Grouped searches: (label, its hits) per group, best group first; ``hits`` is their
    # concatenation and the offsets count groups.
    groups: list[tuple[str | None, list[Hit]]] | None = None


@dataclass(frozen=True)
class Candidates:
    """Each query's global ranking: ``ids`` (B, depth), best first, -1 past the end (fewer
    items than ``depth`` match its filter); ``counts`` (B,) the real ones."""

    ids: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class Gathered:
    """What re-ranking needs from the index, W columns per query: ``positions`` (B, W) in each
    query's global ranking, meaningful where ``valid`` (B, W); the ``ids`` (B, W) there; their
    stored ``grids`` (B, W, R, D) float16 (read from the index on the host, or a tensor
    gathered on the device where the grids are kept there) and ``vectors`` (B, W, D) float32;
    the item records by id. One row (B = 1) holds candidates shared by every query."""

    positions: np.ndarray
    valid: np.ndarray
    ids: np.ndarray
    grids: np.ndarray | torch.Tensor
    vectors: np.ndarray
    items: dict[int, Item]


def coarse_search(
    search: SearchFunction, vectors: np.ndarray, filters: Sequence[LabelFilter], depth: int
) -> Candidates:
    """The top ``depth`` by the global vector for each query (``vectors`` (B, D)) among the
    items its filter allows: one search per distinct filter."""
    ids = np.full((len(filters), depth), -1, dtype=np.int64)
    for where in dict.fromkeys(filters):
        rows = np.array([i for i, f in enumerate(filters) if f == where])
        _, found = search(vectors[rows], depth, where)
        ids[rows, : found.shape[1]] = found
    return Candidates(ids, (ids >= 0).sum(axis=1))  # FAISS pads with -1 past the end


def needed_positions(options: SearchOptions, head: int, count: int) -> np.ndarray:
    """The positions of a global ranking (of ``count`` candidates) that a page needs matched:
    the first ``head`` (to be sorted by score), and the page's positions past them."""
    head = min(head, count)
    end = min(options.offset + options.k, count)
    return np.r_[np.arange(head), np.arange(max(head, options.offset), end)]


def gather(
    index: AnyIndex,
    candidates: Candidates,
    needed: Sequence[np.ndarray],
    resident: DeviceSearch | None = None,
) -> Gathered | None:
    """Read the grids, vectors and records of the ``needed`` positions of each query's ranking
    (ragged rows padded to the widest; padding repeats a real id and is not ``valid``); the
    grids from ``resident`` when it keeps them on its device. None when no query needs any."""
    width = max((len(n) for n in needed), default=0)
    if width == 0:
        return None
    positions = np.zeros((len(needed), width), dtype=np.int64)
    for row, n in enumerate(needed):
        positions[row, : len(n)] = n
    valid = np.arange(width) < np.array([len(n) for n in needed])[:, None]
    ids = np.take_along_axis(candidates.ids, positions, axis=1)
    ids = np.where(valid, ids, ids[valid][0])
    flat = ids.ravel()
    grids = _grids(index, flat, resident)
    grids = grids.reshape(*ids.shape, *grids.shape[1:])
    vectors = index.vectors(flat).reshape(*ids.shape, -1)
    return Gathered(positions, valid, ids, grids, vectors, index.items(np.unique(flat)))


def gather_shared(
    index: AnyIndex, ids: np.ndarray, resident: DeviceSearch | None = None
) -> Gathered:
    """The candidates ``ids`` of every query alike: one row, read once."""
    ids = np.asarray(ids, dtype=np.int64)[None]
    positions = np.arange(ids.shape[1])[None]
    return Gathered(positions, np.ones(ids.shape, dtype=bool), ids,
                    _grids(index, ids[0], resident)[None], index.vectors(ids[0])[None],
                    index.items(ids[0]))  # fmt: skip


def _grids(
    index: AnyIndex, ids: np.ndarray, resident: DeviceSearch | None
) -> np.ndarray | torch.Tensor:
    kept = resident.grids(ids) if resident is not None else None
    return kept if kept is not None else index.grids(ids)


def rerank(
    queries: Embedding, gathered: Gathered, config: ModelConfig, device: torch.device
) -> StructuralMatch:
    """Every query against its gathered candidates (or the shared row) in one structural
    match on ``device`` (grids travel as float16); the result (B, W) stays there."""
    n = len(queries)
    with torch.inference_mode():
        grids = torch.as_tensor(gathered.grids).to(device).float()
        vectors = torch.from_numpy(gathered.vectors).to(device)
        if len(gathered.ids) != n:  # one shared row
            grids, vectors = grids.expand(n, -1, -1, -1), vectors.expand(n, -1, -1)
        return structural_match(
            queries.parts.to(device), queries.vector.to(device), grids, vectors, config.matching
        )
