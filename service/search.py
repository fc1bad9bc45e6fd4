"""The search pipeline after embedding, one function per named stage, each with a typed result:

    coarse_search  -> Candidates       each query's global ranking, by its global vector
    gather         -> Gathered         the stored grids and vectors of the positions it needs
    rerank         -> StructuralMatch  one structural match for every query of a batch
    rank           -> Ranking          the two-stage rule: the positions of each query's page
    pick_pages     -> PagePairs        the pages' pairs of the match, on the host
    explain_page   -> list[Hit]        a page's hits, explained when asked

(decoding and embedding, the first two stages, run on the engine's batchers). The stages are
plain functions of their inputs: they know no HTTP, no lock and no timer; the engine
(:mod:`service.engine`) runs the first two under the index lock and times each stage, and the
routes turn the results into JSON. The ranking rule itself is the model library's
(:func:`model.matching.rerank_positions`), the one that ``diml evaluate`` measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from index_builder import Item, LabelFilter
from index_builder.device_search import DeviceSearch
from index_builder.opening import AnyIndex
from model import Embedding, Explanation, ImageGeometry, explain, structural_match
from model.config import ModelConfig
from model.images import geometry_of
from model.matching import StructuralMatch, rerank_positions

# (vectors (B, D), k, filter) -> (scores, ids), both (B, <= k), ids -1 past the end
SearchFunction = Callable[[np.ndarray, int, LabelFilter | None], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SearchOptions:
    """k results from position ``offset`` of one ranking (the top ``rerank_k`` of the global
    ranking re-ranked, the rest in global order), among the items ``where`` allows; hits that
    score below ``min_score`` left out; explanations with the ``matches`` strongest part pairs
    when ``explain``."""

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


@dataclass(frozen=True)
class Ranking:
    """Each query's page as positions of its global ranking, best first (``pages``), and where
    each position's scores lie in the match (``column`` (B, depth), -1 where not matched)."""

    pages: list[list[int]]
    column: np.ndarray


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


def needed_positions(options: SearchOptions, count: int, reorders: bool) -> np.ndarray:
    """The positions of a global ranking (of ``count`` candidates) that a page needs matched:
    the re-ranked head when re-ranking reorders, and the page's positions past it."""
    head = min(options.rerank_k, count) if reorders else 0
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


def rank(
    match: StructuralMatch,
    gathered: Gathered,
    candidates: Candidates,
    options: Sequence[SearchOptions],
    reorders: bool,
) -> Ranking:
    """Each query's page under the two-stage rule: its top ``rerank_k`` by score, the rest in
    global order (no head when re-ranking cannot reorder), then ``k`` from ``offset``.
    Positions not matched are never sorted (their score is -inf and they lie past the head).
    Only the scores leave the match's device here."""
    b, depth = candidates.ids.shape
    rows, cols = np.nonzero(gathered.valid)
    at = gathered.positions[rows, cols]
    score = torch.full((b, depth), float("-inf"))
    score[rows, at] = match.score.cpu()[rows, cols]
    column = np.full((b, depth), -1, dtype=np.int64)
    column[rows, at] = cols
    pages: list[list[int]] = [[] for _ in range(b)]
    heads = [o.rerank_k if reorders else 0 for o in options]
    for head in dict.fromkeys(heads):
        chosen = [i for i, h in enumerate(heads) if h == head]
        order = rerank_positions(score[chosen], head)
        for i, positions in zip(chosen, order, strict=True):
            ranking = positions[positions < int(candidates.counts[i])]
            o = options[i]
            pages[i] = ranking[o.offset : o.offset + o.k].tolist()
    return Ranking(pages, column)


@dataclass(frozen=True)
class PagePairs:
    """The pages' (query, candidate) pairs taken out of a batch's match: ``match`` over
    (1, H) on the CPU, query b's hits at ``starts[b]:starts[b + 1]``, their item ``ids``."""

    match: StructuralMatch
    starts: np.ndarray
    ids: list[np.ndarray]


def pick_pages(match: StructuralMatch, gathered: Gathered, ranking: Ranking) -> PagePairs:
    """Only the pages' pairs leave the match's device, in one transfer
    (:meth:`StructuralMatch.pick`); the rest of the (B, W) match is never copied."""
    sizes = [len(page) for page in ranking.pages]
    columns = [ranking.column[b, page] for b, page in enumerate(ranking.pages)]
    device = match.score.device
    rows = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)).to(device)
    cols = torch.from_numpy(np.concatenate(columns).astype(np.int64)).to(device)
    ids = [gathered.ids[b, c] for b, c in enumerate(columns)]
    return PagePairs(match.pick(rows, cols).to("cpu"), np.cumsum([0, *sizes]), ids)


def explain_page(
    pairs: PagePairs,
    b: int,
    ranking: Ranking,
    items: dict[int, Item],
    geometry: ImageGeometry,
    options: SearchOptions,
    config: ModelConfig,
) -> list[Hit]:
    """Query ``b``'s page as hits, explained when its options ask."""
    columns = range(int(pairs.starts[b]), int(pairs.starts[b + 1]))
    return explain_hits(pairs.match, 0, columns, ranking.pages[b], pairs.ids[b], items, geometry,
                        options, config)  # fmt: skip


def explain_hits(
    match: StructuralMatch,
    row: int,
    columns: Sequence[int],
    positions: Sequence[int],
    ids: Sequence[int] | np.ndarray,
    items: dict[int, Item],
    geometry: ImageGeometry,
    options: SearchOptions,
    config: ModelConfig,
) -> list[Hit]:
    """Hits from row ``row`` of ``match`` (on the CPU): hit h is its column ``columns[h]``, at
    ``positions[h]`` of the query's global ranking, item ``ids[h]``. Items removed since the
    search and hits below ``min_score`` are left out."""
    hits: list[Hit] = []
    for c, position, item_id in zip(columns, positions, ids, strict=True):
        item = items.get(int(item_id))
        score = float(match.score[row, c])
        if item is None or (options.min_score is not None and score < options.min_score):
            continue
        explanation = None
        if options.explain:
            explanation = explain(
                match,
                geometry,
                geometry_of(item.width, item.height, config.preprocessing),
                config.grid,
                config.matching,
                index=(row, c),
                top=options.matches,
            )
        hits.append(Hit(
            item, score, float(match.global_similarity[row, c]),
            float(match.structural_similarity[row, c]), position < options.rerank_k,
            position + 1, explanation,
        ))  # fmt: skip
    return hits
