"""The FAISS index of global vectors: inner product on unit vectors, item ids as FAISS ids.

Factories are FAISS factory strings ("Flat", "IVF1024,Flat", "HNSW32", ...). Exact ("Flat") and
graph indexes get an ``IDMap2`` so that they carry item ids; IVF indexes carry ids natively.
Removal deletes from the index where the index type can (flat, IVF), and otherwise filters the
ids out of every search (HNSW), so a removed item is never returned. Search parameters
(``nprobe``, ``efSearch``) travel with each call; the shared index is never modified to search.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from model.files import replacing

# Floats one exact query may read: about 6 ms on 2 cores (measured by bench/scale_bench.py: 5.7 ms
# for 100k items at 128-d, 3.5 ms for 10k at 1,280-d; 58 ms for a million at 128-d).
EXACT_SCAN = 12_800_000


def default_factory(count: int, dim: int = 128) -> str:
    """Exact search while a query reads under 12.8 M floats (100k items at 128-d, 10k at the
    head-less 1,280-d); above, IVF with about 4 sqrt(n) lists (a power of two, 256 to 65,536),
    never more than one per 39 items (what FAISS's k-means needs to train them)."""
    if count * dim < EXACT_SCAN:
        return "Flat"
    lists = min(max(2 ** round(math.log2(4 * math.sqrt(count))), 256), 65536)
    trainable = 2 ** int(math.log2(max(count // 39, 1)))
    return f"IVF{min(lists, trainable)},Flat"


class VectorIndex:
    """A FAISS index plus the ids filtered out of search where it cannot delete."""

    def __init__(self, index: faiss.Index, factory: str) -> None:
        self.index = index
        self.factory = factory
        self.filtered: set[int] = set()
        self._selector: faiss.IDSelector | None = None
        self._selector_ids: np.ndarray | None = None

    @classmethod
    def create(cls, factory: str, dim: int) -> VectorIndex:
        try:
            inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(
                f"{factory!r} is not a FAISS factory string FAISS accepts ({e}); "
                "try 'Flat', 'IVF1024,Flat' or 'HNSW32'"
            ) from e
        native_ids = isinstance(faiss.try_extract_index_ivf(inner), faiss.IndexIVF)
        return cls(inner if native_ids else faiss.IndexIDMap2(inner), factory)

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def training_size(self, available: int) -> int:
        """How many vectors to train on: 40 per IVF list (FAISS's k-means wants 39), at least
        100k, never more than there are."""
        ivf = faiss.try_extract_index_ivf(self.index)
        lists = int(ivf.nlist) if ivf is not None else 0
        return min(available, max(100_000, 40 * lists))

    def train(self, vectors: np.ndarray) -> None:
        """vectors: (n, D) float32, a sample of the gallery (IVF: at least 39 per list)."""
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids: (n,) int64; vectors: (n, D) float32, unit length."""
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> None:
        """Take ``ids`` out of search results from now on."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:  # this index type cannot delete: filter at search time
            self.filtered.update(int(i) for i in ids)
            self._selector = None

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        ef_search: int = 128,
        allow: np.ndarray | None = None,
        deny: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries: (n, D) float32 -> scores (n, k) float32, ids (n, k) int64 (-1 past the end).

        ``nprobe``: IVF lists visited (default: a sixteenth of them, at least 32: with 256 lists
        over 10k items, 16 kept the final top 10 of 99.0% of queries, 32 of more);
        ``ef_search``: HNSW breadth (at least k). ``allow``: only these ids may be returned
        (None: any); ``deny``: these may not. The selection is applied inside the search, so
        k ids come back whenever k are allowed; where an approximate index finds fewer within
        its usual breadth, the search is repeated exhaustively.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, max(self.ntotal, 1)))
        if allow is not None and len(allow) == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full(
                (len(queries), k), -1, np.int64
            )
        ivf = faiss.try_extract_index_ivf(self.index)
        lists = int(ivf.nlist) if ivf is not None else 0
        if nprobe is None:
            nprobe = max(32, lists // 16) if ivf is not None else 32
        selection = self._selection(allow, deny)
        params = self._params(nprobe, max(ef_search, k), selection[-1] if selection else None)
        scores, ids = self.index.search(queries, k, params=params)
        if (allow is not None or deny is not None) and self._approximate():
            wanted = min(k, len(allow)) if allow is not None else k
            if ((ids >= 0).sum(axis=1) < wanted).any():  # a rare selection: look everywhere
                params = self._params(max(lists, 1), max(self.ntotal, k), selection[-1])
                scores, ids = self.index.search(queries, k, params=params)
        return scores, ids

    def _approximate(self) -> bool:
        inner = self._inner()
        return isinstance(faiss.try_extract_index_ivf(inner), faiss.IndexIVF) or isinstance(
            inner, faiss.IndexHNSW
        )

    def _inner(self) -> faiss.Index:
        return faiss.downcast_index(
            self.index.index if isinstance(self.index, faiss.IndexIDMap) else self.index
        )

    def _selection(
        self, allow: np.ndarray | None, deny: np.ndarray | None
    ) -> list[faiss.IDSelector]:
        """The selectors of one search, their conjunction last. FAISS keeps bare pointers to
        the inner selectors, so the caller holds the whole list while it searches."""
        if self.filtered and self._selector is None:
            self._selector_ids = np.fromiter(self.filtered, dtype=np.int64)
            self._selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._selector_ids))
        held: list[faiss.IDSelector] = []
        conditions: list[faiss.IDSelector] = [self._selector] if self.filtered else []
        if allow is not None:
            conditions.append(faiss.IDSelectorBatch(np.asarray(allow, dtype=np.int64)))
        if deny is not None and len(deny):
            denied = faiss.IDSelectorBatch(np.asarray(deny, dtype=np.int64))
            held.append(denied)
            conditions.append(faiss.IDSelectorNot(denied))
        held += conditions
        while len(conditions) > 1:
            both = faiss.IDSelectorAnd(conditions.pop(), conditions.pop())
            held.append(both)
            conditions.append(both)
        return held

    def _params(
        self, nprobe: int, ef_search: int, sel: faiss.IDSelector | None
    ) -> faiss.SearchParameters | None:
        inner = self._inner()
        if isinstance(faiss.try_extract_index_ivf(inner), faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def write(self, path: Path) -> None:
        """Write aside, fsync, rename."""
        with replacing(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def read(cls, path: Path, factory: str) -> VectorIndex:
        return cls(faiss.read_index(str(path)), factory)
