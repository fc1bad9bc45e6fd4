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
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from index_builder import Item
from model import Embedding, ModelInput
from model.explain import bases_of, with_global_split
from service.failures import NotFoundError
from service.gallery import Gallery
from service.limits import in_thread
from service.search import Hit, Page

log = logging.getLogger(__name__)
Bases = list[torch.Tensor | None]  # one global basis (R, D) per query; None: none to split with


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


def query_bases(queries: Embedding, grid: int, stored: Bases | None = None) -> Bases:
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


class GlobalSplit:
    """Splits the global term of search explanations: items' bases from ``cache``, or by
    decoding (``decode``) and embedding (``embed``, ``batch`` pictures at a time) their stored
    pictures again; their global vectors from ``gallery``."""

    def __init__(
        self,
        cache: BasisCache,
        gallery: Gallery,
        grid: int,
        decode: Callable[[Item], ModelInput],
        embed: Callable[[list[ModelInput]], Awaitable[Embedding]],
        batch: int,
    ) -> None:
        self.cache, self.gallery, self.grid = cache, gallery, grid
        self.decode, self.embed, self.batch = decode, embed, batch

    async def item_bases(self, items: list[Item]) -> dict[int, torch.Tensor | None]:
        """Each item's global basis (R, D) (:mod:`model.attribution`); None for an item whose
        picture is gone."""
        out: dict[int, torch.Tensor | None] = {}
        missing: list[tuple[Item, ModelInput]] = []
        for item in {item.id: item for item in items}.values():
            out[item.id] = self.cache.get(item)
            if out[item.id] is None:
                try:
                    missing.append((item, await in_thread(self.decode, item)))
                except NotFoundError:
                    log.info("gallery item %d: picture gone, its global term is not split", item.id)
        for start in range(0, len(missing), self.batch):
            chunk = missing[start : start + self.batch]
            embedding = await self.embed([decoded for _, decoded in chunk])
            bases = bases_of(embedding, self.grid)
            assert bases is not None  # the batcher keeps the maps
            for (item, _), basis in zip(chunk, bases.float(), strict=True):
                self.cache.put(item, basis)
                out[item.id] = basis
        return out

    async def pages(
        self, pages: list[Page], queries: Embedding, stored: Bases | None = None
    ) -> list[Page]:
        """``pages`` (page b answering ``queries[b]``) with their explanations' global term split
        over both images' regions (:func:`split_pages`); ``stored``: the bases of queries that
        are gallery items."""
        items = [h.item for page in pages for h in page.hits if h.explanation is not None]
        if not items:
            return pages
        item_bases = await self.item_bases(items)
        ids = np.array(sorted(item_bases), dtype=np.int64)
        index = self.gallery.index
        with self.gallery.lock:
            try:
                found = index.vectors(ids)
            except KeyError:  # an item deleted since the search is left unsplit, not an error
                ids = np.array(sorted(index.items(ids)), dtype=np.int64)
                found = index.vectors(ids)
        vectors = dict(zip(ids.tolist(), found, strict=True))
        bases = query_bases(queries, self.grid, stored)
        return split_pages(pages, queries, bases, item_bases, vectors)
