"""A naive reference for near-duplicates, the first, exhaustive way of finding them (every
proposed pair matched afresh, the groups by a plain union-find), and a small gallery in memory
to run it and the cached graph of ``index_builder.duplicates`` on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from index_builder.duplicates import stored_embedding
from model.config import MatchingConfig
from model.matching import match_pairs


class MemoryGallery:
    """A gallery in memory with the reads duplicates need: exact inner-product search (as a
    folder index below 100k items), ids that are never reused."""

    def __init__(self, vectors: np.ndarray, grids: np.ndarray) -> None:
        self._vectors, self._grids = vectors, grids
        self.ids = np.arange(len(vectors), dtype=np.int64)
        self._next = len(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self._vectors[self.ids].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        found = np.full((len(queries), k), -1, dtype=np.int64)
        best = np.full((len(queries), k), -np.inf, dtype=np.float32)
        found[:, : order.shape[1]] = self.ids[order]
        best[:, : order.shape[1]] = np.take_along_axis(scores, order, 1)
        return best, found

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self._vectors[ids]

    def grids(self, ids: np.ndarray) -> np.ndarray:
        return self._grids[ids]

    def add(self, vectors: np.ndarray, grids: np.ndarray) -> np.ndarray:
        new = np.arange(self._next, self._next + len(vectors))
        self._next += len(vectors)
        self._vectors = np.concatenate([self._vectors, vectors])
        self._grids = np.concatenate([self._grids, grids])
        self.ids = np.concatenate([self.ids, new])
        return new

    def remove(self, ids: list[int]) -> None:
        self.ids = self.ids[~np.isin(self.ids, ids)]


def clustered(photos: int, copies: int, seed: int, r: int = 4, d: int = 16) -> tuple[Any, Any]:
    """``photos`` x ``copies`` items: vectors (n, d) float32 and grids (n, r, d) float16, each
    photo's copies its parts plus noise of a random strength, so pairs spread over [0, 1]."""
    rng = np.random.default_rng(seed)
    base = np.repeat(rng.standard_normal((photos, r, d)), copies, 0) + 0.4
    noise = rng.uniform(0.1, 1.2, size=(len(base), 1, 1))
    raw = (base + noise * rng.standard_normal(base.shape)).astype(np.float32)
    vectors = raw.mean(1) / np.linalg.norm(raw.mean(1), axis=1, keepdims=True)
    grids = raw / np.linalg.norm(raw, axis=2, keepdims=True)
    return vectors.astype(np.float32), grids.astype(np.float16)


def exhaustive_groups(
    index: Any, matching: MatchingConfig, threshold: float, structural: float, neighbours: int
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """The groups as first computed: pairs proposed by each item's search, all matched in one
    batch, kept above both thresholds, joined by union-find; (ids, pairs most alike first)."""
    proposed: set[tuple[int, int]] = set()
    for item in index.ids.tolist():
        scores, found = index.search(index.vectors(np.array([item])), neighbours + 1)
        for score, other in zip(scores[0].tolist(), found[0].tolist(), strict=True):
            if other >= 0 and other != item and score >= threshold:
                proposed.add((min(item, other), max(item, other)))
    if not proposed:
        return []
    a, b = (np.array(side) for side in zip(*sorted(proposed), strict=True))
    with torch.inference_mode():
        match = match_pairs(stored_embedding(index, a), stored_embedding(index, b), matching)
    confirmed = [
        (x, y, s)
        for x, y, g, s in zip(a.tolist(), b.tolist(), match.global_similarity[:, 0].tolist(),
                              match.structural_similarity[:, 0].tolist(), strict=True)
        if g >= threshold and s >= structural
    ]  # fmt: skip
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for x, y, _ in confirmed:
        parent[max(root(x), root(y))] = min(root(x), root(y))
    members: dict[int, list[int]] = {}
    for x in sorted(parent):
        members.setdefault(root(x), []).append(x)
    groups = []
    for ids in members.values():
        pairs = sorted((p for p in confirmed if root(p[0]) == root(ids[0])),
                       key=lambda p: (-p[2], p[0], p[1]))  # fmt: skip
        groups.append((ids, [(x, y) for x, y, _ in pairs]))
    return sorted(groups, key=lambda g: (-len(g[0]), g[0][0]))
