"""The ordering and explaining stages, shared by every search:

    spread         -> Spread          a batch's match laid over each query's global ranking
    by_examples    -> score (W,)      a search by examples' score of its candidates
    rank           -> list[ndarray]   each query's ranking: the two-stage rule
    group_by_label -> groups          a ranking's best hits per label
    pick_pages     -> match (1, H)    the pages' pairs of a batch's match, on the host
    explain_hits   -> list[Hit]       a page's hits (PagePairs), explained when asked

The order has one owner: :func:`rank` applies :func:`model.matching.rerank_positions`, the rule
``diml evaluate`` measures, to whatever a search scores. Plain functions of their inputs, as
the stages of :mod:`service.search`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from index_builder import Item
from model import ImageGeometry, explain
from model.config import ModelConfig
from model.matching import StructuralMatch, rerank_positions
from model.preprocessing import geometry_of
from service.search import Gathered, Hit, SearchOptions


@dataclass(frozen=True)
class Spread:
    """A match's scores at the positions of each query's global ranking: ``score`` (B, depth),
    -inf where not matched; ``column`` (B, depth) of the match there, -1 where not matched."""

    score: torch.Tensor
    column: np.ndarray


def spread(match: StructuralMatch, gathered: Gathered, depth: int) -> Spread:
    """Lay the (B, W) match of ``gathered`` over (B, depth) global rankings. Only the scores
    leave the match's device here."""
    b = len(gathered.positions)
    rows, cols = np.nonzero(gathered.valid)
    at = gathered.positions[rows, cols]
    score = torch.full((b, depth), float("-inf"))
    score[rows, at] = match.score.cpu()[rows, cols]
    column = np.full((b, depth), -1, dtype=np.int64)
    column[rows, at] = cols
    return Spread(score, column)


def rank(
    score: torch.Tensor, counts: Sequence[int] | np.ndarray, heads: Sequence[int]
) -> list[np.ndarray]:
    """Each query's ranking under the two-stage rule (:func:`model.matching.rerank_positions`).

    score: (B, depth) of each query's candidates in global order (-inf where not matched:
    only past its head), counts: (B,) its real candidates, heads: (B,) how many of them are
    sorted by score -> B arrays of positions into its global order, best first."""
    order = rerank_positions(score, torch.as_tensor(list(heads), dtype=torch.int64)).numpy()
    return [row[row < n] for row, n in zip(order, counts, strict=True)]


def group_by_label(
    ranking: np.ndarray, ids: np.ndarray, items: dict[int, Item], want: int, size: int
) -> tuple[list[tuple[str | None, np.ndarray]], bool]:
    """The first ``want`` labels of a ranking (positions into ``ids``; items not in ``items``,
    removed since, left out), in the order of their best hit, each with its first ``size``
    positions; and whether all ``want`` groups are full."""
    found = [items.get(int(i)) for i in ids[ranking]]
    ranking = ranking[np.array([item is not None for item in found], dtype=bool)]
    labels = [item.label for item in found if item is not None]
    first = {label: g for g, label in enumerate(dict.fromkeys(labels))}
    group = np.array([first[label] for label in labels], dtype=np.int64)
    by_group = np.argsort(group, kind="stable")
    within = np.empty_like(group)  # each position's place in its group
    within[by_group] = np.arange(len(group)) - np.searchsorted(group[by_group], group[by_group])
    chosen = (group < want) & (within < size)
    members = [ranking[chosen & (group == g)] for g in range(min(want, len(first)))]
    full = len(members) == want and all(len(m) == size for m in members)
    return list(zip(first, members, strict=False)), full


def by_examples(
    match: StructuralMatch, positives: int
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The ranking score of a search by examples, from a match (E, W) of the examples (the
    ``positives`` first) with W candidates:

        score(c) = max over positives s(p, c) - max over negatives s(n, c)

    (no negatives: the second term is 0), like any of the positives, unlike all of the
    negatives -> score (W,); the positive each candidate matches best (W,); its 1-based rank
    by mean global similarity to the positives (W,)."""
    liked, best = match.score[:positives].max(dim=0)
    disliked = match.score[positives:].amax(dim=0) if len(match.score) > positives else 0.0
    closeness = torch.argsort(match.global_similarity[:positives].mean(dim=0), descending=True)
    global_rank = torch.empty_like(closeness)
    global_rank[closeness] = torch.arange(1, len(closeness) + 1)
    return liked - disliked, best.numpy(), global_rank.numpy()


@dataclass(frozen=True)
class PagePairs:
    """Hits to be, best first, as pairs of a match on the CPU: hit h is row ``rows[h]``,
    column ``columns[h]``, item ``ids[h]``, ranking score ``score[h]``; ``global_rank[h]``
    (1-based) where it stood in its query's global ranking, ``reranked[h]`` whether the score
    ordered it. ``by_example``: the rows are the positives of a search by examples."""

    rows: np.ndarray
    columns: np.ndarray
    ids: np.ndarray
    score: np.ndarray
    global_rank: np.ndarray
    reranked: np.ndarray
    by_example: bool = False


def pairs_at(
    match: StructuralMatch,
    columns: np.ndarray,
    positions: np.ndarray,
    ids: np.ndarray,
    rerank_k: int,
) -> PagePairs:
    """Row 0 of ``match`` (on the CPU): hit h is column ``columns[h]``, at ``positions[h]``
    of the query's global ranking, item ``ids[h]``; scored as the match scores it."""
    columns = np.asarray(columns, dtype=np.int64)
    score = match.score[0, torch.from_numpy(columns)].numpy()
    positions = np.asarray(positions, dtype=np.int64)
    return PagePairs(np.zeros_like(columns), columns, np.asarray(ids), score, positions + 1,
                     positions < rerank_k)  # fmt: skip


def pick_pages(
    match: StructuralMatch, gathered: Gathered, column: np.ndarray, pages: list[np.ndarray]
) -> tuple[StructuralMatch, list[np.ndarray], list[np.ndarray]]:
    """Only the pages' pairs leave the match's device, in one transfer
    (:meth:`StructuralMatch.pick`): a match over (1, H) on the CPU, each page's columns there
    and its item ids."""
    columns = [column[b, page] for b, page in enumerate(pages)]
    sizes = [len(page) for page in pages]
    device = match.score.device
    rows = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)).to(device)
    cols = torch.from_numpy(np.concatenate(columns).astype(np.int64)).to(device)
    ids = [gathered.ids[b, c] for b, c in enumerate(columns)]
    starts = np.cumsum([0, *sizes])
    picked = [np.arange(starts[b], starts[b + 1]) for b in range(len(sizes))]
    return match.pick(rows, cols).to("cpu"), picked, ids


def explain_hits(
    match: StructuralMatch,
    pairs: PagePairs,
    items: dict[int, Item],
    geometries: Sequence[ImageGeometry],
    options: SearchOptions,
    config: ModelConfig,
) -> list[Hit]:
    """The hits of ``pairs`` (``match`` on the CPU; ``geometries[row]`` the query image of a
    row), explained when ``options`` ask. Items removed since the search and hits below
    ``min_score`` are left out."""
    keep = np.array([int(i) in items for i in pairs.ids], dtype=bool)
    if options.min_score is not None:
        keep &= pairs.score.astype(np.float64) >= options.min_score
    hits: list[Hit] = []
    for h in np.flatnonzero(keep).tolist():
        row, c = int(pairs.rows[h]), int(pairs.columns[h])
        item = items[int(pairs.ids[h])]
        explanation = None
        if options.explain:
            explanation = explain(
                match, geometries[row], geometry_of(item.width, item.height, config.preprocessing),
                config.grid, config.matching, index=(row, c), top=options.matches,
            )  # fmt: skip
        hits.append(Hit(
            item, float(pairs.score[h]), float(match.global_similarity[row, c]),
            float(match.structural_similarity[row, c]), bool(pairs.reranked[h]),
            int(pairs.global_rank[h]), explanation, row if pairs.by_example else None,
            float(match.score[row, c]),
        ))  # fmt: skip
    return hits
