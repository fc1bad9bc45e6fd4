"""Gallery items' global bases, and the global term of explanations split with them.

An explanation accounts for the whole score (:mod:`model.explain`): its global term splits over
each image's regions through the image's global basis (R x D, :mod:`model.attribution`), made
from its projected feature map. A query has its map from its own embedding; the index keeps only
a gallery item's part grid and global vector, so an item's basis comes from embedding its stored
picture again. Bases are kept in a least-recently-used cache within a byte budget: the items
that searches keep returning are embedded once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import numpy as np
import torch

from index_builder import Item
from model import Embedding
from model.explain import bases_of, with_global_split
from service.search import Hit, Page


class BasisCache:
    """Item bases by (id, sha256), least recently used first out past ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self._bases: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item: Item) -> torch.Tensor | None:
        with self._lock:
            found = self._bases.get((item.id, item.sha256))
            if found is not None:
                self._bases.move_to_end((item.id, item.sha256))
            return found

    def put(self, item: Item, basis: torch.Tensor) -> None:
        nbytes = basis.numel() * basis.element_size()
        if nbytes > self.budget:
            return
        with self._lock:
            key = (item.id, item.sha256)
            if key in self._bases:
                return
            self._bases[key] = basis
            self.size += nbytes
            while self.size > self.budget:
                _, old = self._bases.popitem(last=False)
                self.size -= old.numel() * old.element_size()


def query_bases(queries: Embedding, grid: int, stored: list[torch.Tensor | None] | None = None
                ) -> list[torch.Tensor | None]:  # fmt: skip
    """Each query's global basis (R, D): ``stored[b]`` where given (a gallery item as the
    query), else from its map where its embedding kept one."""
    made = bases_of(queries, grid)
    out: list[torch.Tensor | None] = [
        None if made is None else made[b] for b in range(len(queries))
    ]
    for b, basis in enumerate(stored or []):
        if basis is not None:
            out[b] = basis
    return out


def split_pages(
    pages: list[Page],
    queries: Embedding,
    bases: list[torch.Tensor | None],
    item_bases: dict[int, torch.Tensor | None],
    vectors: dict[int, np.ndarray],
) -> list[Page]:
    """``pages`` (page b answers query b) with each explanation's global term split: the query's
    side with ``bases`` (one per query, :func:`query_bases`), the result's with ``item_bases``
    by item id (None: its picture is gone), each against the other side's global vector (the
    result's stored one, ``vectors`` by item id; a hit whose item is not there, deleted since
    the search, keeps its global term whole). An example search's hit is explained against
    its positive."""
    out = []
    for b, page in enumerate(pages):
        done: dict[int, Hit] = {}
        for hit in page.hits:
            if hit.explanation is None or hit.item.id not in vectors:  # deleted meanwhile
                continue
            q = hit.positive if hit.positive is not None else b
            own = (bases[q], item_bases.get(hit.item.id))
            other = (queries.vector[q], torch.from_numpy(vectors[hit.item.id]))
            explanation = with_global_split(hit.explanation, own, other)
            done[id(hit)] = dataclasses.replace(hit, explanation=explanation)
        hits = [done.get(id(h), h) for h in page.hits]
        groups = None
        if page.groups is not None:
            groups = [(label, [done.get(id(h), h) for h in members])
                      for label, members in page.groups]  # fmt: skip
        out.append(dataclasses.replace(page, hits=hits, groups=groups))
    return out
