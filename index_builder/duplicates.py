"""Near-duplicates in a gallery: crops, mirrors, rescales and re-encodings of one picture.

Two items are near-copies when their global vectors are close (``global >= threshold``, found
by a k-nearest-neighbour search of every item against the index) and their part grids confirm
it (``structural >= structural_threshold``, the optimal-transport match of
:func:`model.matching.match_pairs`): a re-encoded or rescaled copy keeps both, while two
different photographs of one kind of thing are close globally but match part by part less
well. Groups are the connected components of the confirmed pairs. The default thresholds are
measured by ``bench/bench_duplicates.py`` (near-copies made from photos of the CUB validation
classes against other photos of the same species).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from index_builder.opening import AnyIndex
from model.config import MatchingConfig
from model.matching import match_pairs
from model.network import Embedding

GLOBAL_THRESHOLD = 0.8
STRUCTURAL_THRESHOLD = 0.7
NEIGHBOURS = 16
BATCH = 512


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
    join them, most alike first."""

    ids: list[int]
    pairs: list[DuplicatePair]


def near_duplicates(
    index: AnyIndex,
    matching: MatchingConfig,
    threshold: float = GLOBAL_THRESHOLD,
    structural_threshold: float = STRUCTURAL_THRESHOLD,
    neighbours: int = NEIGHBOURS,
    check: Callable[[], object] | None = None,
) -> list[DuplicateGroup]:
    """Every group of near-copies in ``index``, largest first (then by smallest id).

    ``neighbours``: how many nearest items of each item are looked at (a larger group is
    still found whole when its members are linked through each other). ``check`` is called
    between batches (a deadline that raises to stop).
    """
    a, b = candidate_pairs(index, threshold, neighbours, check)
    if len(a) == 0:
        return []
    global_sim = np.empty(len(a), dtype=np.float32)
    structural = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), BATCH):
        left, right = a[start : start + BATCH], b[start : start + BATCH]
        with torch.inference_mode():
            match = match_pairs(
                stored_embedding(index, left), stored_embedding(index, right), matching
            )
        global_sim[start : start + len(left)] = match.global_similarity[:, 0].numpy()
        structural[start : start + len(left)] = match.structural_similarity[:, 0].numpy()
        if check is not None:
            check()
    keep = (global_sim >= threshold) & (structural >= structural_threshold)
    a, b, global_sim, structural = a[keep], b[keep], global_sim[keep], structural[keep]
    return _groups(a, b, global_sim, structural)


def candidate_pairs(
    index: AnyIndex,
    threshold: float,
    neighbours: int,
    check: Callable[[], object] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b, each once) whose global similarity reaches ``threshold``."""
    ids = np.asarray(index.ids, dtype=np.int64)
    found_a, found_b = [], []
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        scores, found = index.search(index.vectors(chunk), neighbours + 1)
        rows, cols = np.nonzero((scores >= threshold) & (found >= 0) & (found != chunk[:, None]))
        found_a.append(np.minimum(chunk[rows], found[rows, cols]))
        found_b.append(np.maximum(chunk[rows], found[rows, cols]))
        if check is not None:
            check()
    pairs = np.unique(np.stack([np.concatenate(found_a), np.concatenate(found_b)], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def stored_embedding(index: AnyIndex, ids: np.ndarray) -> Embedding:
    """The stored parts (as float32) and global vectors of the items ``ids``."""
    grids = torch.from_numpy(index.grids(ids).astype(np.float32))
    return Embedding(grids, torch.from_numpy(index.vectors(ids)))


def _groups(
    a: np.ndarray, b: np.ndarray, global_sim: np.ndarray, structural: np.ndarray
) -> list[DuplicateGroup]:
    """Connected components of the pairs: each item takes the smallest id it is linked to,
    repeated (with pointer jumping) until nothing changes."""
    nodes, inverse = np.unique(np.r_[a, b], return_inverse=True)
    left, right = inverse[: len(a)], inverse[len(a) :]
    root = np.arange(len(nodes))
    while True:
        before = root.copy()
        np.minimum.at(root, left, root[right])
        np.minimum.at(root, right, root[left])
        root = root[root]
        if np.array_equal(root, before):
            break
    groups = []
    for r in np.unique(root):
        members = root == r
        inside = members[left]
        pairs = [
            DuplicatePair(int(x), int(y), float(g), float(s))
            for x, y, g, s in zip(a[inside], b[inside], global_sim[inside], structural[inside],
                                  strict=True)
        ]  # fmt: skip
        pairs.sort(key=lambda p: (-p.structural_similarity, p.a, p.b))
        groups.append(DuplicateGroup(nodes[members].tolist(), pairs))
    groups.sort(key=lambda g: (-len(g.ids), g.ids[0]))
    return groups
