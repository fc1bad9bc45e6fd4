"""Groups of near-copies (:mod:`index_builder.duplicates`) as values: the connected components
of the confirmed pairs, kept as arrays and turned into :class:`DuplicateGroup` values a page
at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DuplicatePair:
    """Two items (``a < b``) and how alike they are."""

    a: int
    b: int
    global_similarity: float
    structural_similarity: float


@dataclass(frozen=True)
class DuplicateGroup:
    """Items that are near-copies of each other (ascending ids) and the confirmed pairs that
    join them, most alike first. ``size`` and ``pair_count`` count the whole group: ``ids`` and
    ``pairs`` may hold only the first of them (:meth:`DuplicateGroups.page`)."""

    ids: list[int]
    pairs: list[DuplicatePair]
    size: int
    pair_count: int


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups of near-copies, largest first (then by smallest id), kept as arrays: a page of
    them becomes :class:`DuplicateGroup` values, the rest stay arrays, so that grouping a large
    gallery again costs milliseconds.

    ids: (N,) the grouped items, group after group, ascending in each; item_starts: (G + 1,)
    where each group's ids begin; a, b, global_similarity, structural_similarity: (M,) the
    confirmed pairs, group after group, most alike first; pair_starts: (G + 1,).
    """

    ids: np.ndarray
    item_starts: np.ndarray
    a: np.ndarray
    b: np.ndarray
    global_similarity: np.ndarray
    structural_similarity: np.ndarray
    pair_starts: np.ndarray

    @classmethod
    def of(
        cls, a: np.ndarray, b: np.ndarray, global_sim: np.ndarray, structural: np.ndarray
    ) -> DuplicateGroups:
        """The connected components of the pairs (a, b) of (M,) ids with their similarities."""
        nodes, inverse = np.unique(np.r_[a, b].astype(np.int64), return_inverse=True)
        left, right = inverse[: len(a)], inverse[len(a) :]
        root = _components(left, right, len(nodes))
        sizes = np.bincount(root, minlength=len(nodes))
        roots = np.unique(root)  # each group's smallest node, ascending: its smallest id
        order = roots[np.lexsort((roots, -sizes[roots]))]
        rank = np.empty(len(nodes), dtype=np.int64)
        rank[order] = np.arange(len(order))
        node_order = np.lexsort((nodes, rank[root]))
        pair_group = rank[root[left]]
        pair_order = np.lexsort((b, a, -structural, pair_group))
        starts = np.r_[0, np.cumsum(sizes[order])]
        pair_starts = np.r_[0, np.cumsum(np.bincount(pair_group, minlength=len(order)))]
        return cls(nodes[node_order], starts, a[pair_order], b[pair_order],
                   global_sim[pair_order], structural[pair_order], pair_starts)  # fmt: skip

    def __len__(self) -> int:
        return len(self.item_starts) - 1

    def page(
        self, offset: int, limit: int, most_items: int | None = None, most_pairs: int | None = None
    ) -> list[DuplicateGroup]:
        """Groups ``offset`` to ``offset + limit``, each with at most ``most_items`` of its ids
        (the smallest) and ``most_pairs`` of its pairs (the most alike)."""
        return [self._group(g, most_items, most_pairs)
                for g in range(min(offset, len(self)), min(offset + limit, len(self)))]  # fmt: skip

    def _group(self, g: int, most_items: int | None, most_pairs: int | None) -> DuplicateGroup:
        first, end = int(self.item_starts[g]), int(self.item_starts[g + 1])
        first_pair, end_pair = int(self.pair_starts[g]), int(self.pair_starts[g + 1])
        shown = slice(first_pair, end_pair if most_pairs is None
                      else min(end_pair, first_pair + most_pairs))  # fmt: skip
        pairs = [DuplicatePair(int(x), int(y), float(gs), float(s)) for x, y, gs, s in zip(
            self.a[shown], self.b[shown], self.global_similarity[shown],
            self.structural_similarity[shown], strict=True)]  # fmt: skip
        ids = self.ids[first : end if most_items is None else min(end, first + most_items)]
        return DuplicateGroup(ids.tolist(), pairs, end - first, end_pair - first_pair)


def _components(left: np.ndarray, right: np.ndarray, count: int) -> np.ndarray:
    """(count,) the connected component of each node as its smallest node: each node takes the
    smallest node it is linked to, repeated (with pointer jumping) until nothing changes."""
    root = np.arange(count)
    while True:
        before = root.copy()
        np.minimum.at(root, left, root[right])
        np.minimum.at(root, right, root[left])
        root = root[root]
        if np.array_equal(root, before):
            return root
