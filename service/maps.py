"""Gallery items' projected feature maps, and the global term of explanations split with them.

An explanation accounts for the whole score (:mod:`model.explain`): its global term splits over
each image's map positions, so it needs each image's projected map (D x h x w floats). A query
has its map from its own embedding; the index keeps only a gallery item's part grid and global
vector (the map would be several times the grid), so an item's map comes from embedding its
stored picture again. Maps are kept in a least-recently-used cache within a byte budget: the
items that searches keep returning are embedded once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import numpy as np
import torch

from index_builder import Item
from model import Embedding
from model.explain import with_global_split
from service.search import Hit, Page


class MapCache:
    """Item maps by (id, sha256), least recently used first out past ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self._maps: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item: Item) -> torch.Tensor | None:
        with self._lock:
            found = self._maps.get((item.id, item.sha256))
            if found is not None:
                self._maps.move_to_end((item.id, item.sha256))
            return found

    def put(self, item: Item, map_: torch.Tensor) -> None:
        nbytes = map_.numel() * map_.element_size()
        if nbytes > self.budget:
            return
        with self._lock:
            key = (item.id, item.sha256)
            if key in self._maps:
                return
            self._maps[key] = map_
            self.size += nbytes
            while self.size > self.budget:
                _, old = self._maps.popitem(last=False)
                self.size -= old.numel() * old.element_size()


def split_pages(
    pages: list[Page],
    queries: Embedding,
    maps: dict[int, torch.Tensor | None],
    vectors: dict[int, np.ndarray],
) -> list[Page]:
    """``pages`` (page b answers query b) with each explanation's global term split: the query's
    side with ``queries.maps`` (where kept), the result's with ``maps`` by item id (None: its
    picture is gone), against the other side's global vector (the result's stored one,
    ``vectors`` by item id). An example search's hit is explained against its positive."""
    out = []
    for b, page in enumerate(pages):
        done: dict[int, Hit] = {}
        for hit in page.hits:
            if hit.explanation is None:
                continue
            q = hit.positive if hit.positive is not None else b
            query_map = None if queries.maps is None else queries.maps[q]
            own = (query_map, maps.get(hit.item.id))
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
