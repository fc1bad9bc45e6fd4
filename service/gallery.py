"""The gallery as the engine reads it: the index behind one lock, its coarse search, and the
version that searches and the duplicate graph check.

The coarse search and the re-rank take the lock apart, so that writers are not held up by the
match; a search that finds an item deleted in between raises :class:`GalleryChangedError` and
runs again (:func:`rerun_if_changed`): it only reads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import ParamSpec, TypeVar

import numpy as np
import torch

from index_builder import Item, LabelFilter
from index_builder.device_search import DeviceSearch
from index_builder.location import Location
from index_builder.opening import AnyIndex, open_index
from model import Embedding
from service.failures import NotFoundError, OverloadedError

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")


class GalleryChangedError(Exception):
    """Items a search found were deleted before their grids were read."""


def again_if_changed(search: Callable[[], T], tries: int = 3) -> T:
    """``search()``, run again (it only reads) while the gallery changes under it."""
    for _ in range(tries - 1):
        try:
            return search()
        except GalleryChangedError:
            log.info("the gallery changed during a search: searching again")
    try:
        return search()
    except GalleryChangedError:
        raise OverloadedError("the gallery is changing too fast to search") from None


def rerun_if_changed(search: Callable[P, T]) -> Callable[P, T]:
    """A search run again (:func:`again_if_changed`) while the gallery changes under it."""

    @functools.wraps(search)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return again_if_changed(lambda: search(*args, **kwargs))

    return run


class Gallery:
    """An opened index, its lock (re-entrant: hold it across several reads), the device search
    when the global vectors (and maybe the grids) are kept on a device, and a count of the
    changes made through this process."""

    def __init__(self, index: AnyIndex, device_search: DeviceSearch | None) -> None:
        self.index, self.device_search = index, device_search
        self.lock = threading.RLock()
        self.changes = 0  # gallery changes since start: what cached answers are keyed on

    @classmethod
    def open(
        cls,
        location: Location,
        fingerprint: str,
        writable: bool,
        device: torch.device,
        device_search: bool | None = None,
        device_grids: bool | None = None,
    ) -> Gallery:
        """Open the index at ``location`` (recovered when ``writable``), with a device search
        when ``device_search`` (by default on CUDA, or when ``device_grids``) keeping the grids
        on ``device`` when ``device_grids`` (by default on CUDA when they take at most half of
        its free memory, leaving room for adds)."""
        index = open_index(location, fingerprint, writable=writable)
        if writable:
            index.recover()
        if device_search is None:  # grids kept on the device come with device search
            device_search = device.type == "cuda" or bool(device_grids)
        if not device_search:
            return cls(index, None)
        if device_grids is None and device.type == "cuda":
            need, free = DeviceSearch.grid_bytes(index), torch.cuda.mem_get_info(device)[0]
            device_grids = need <= free // 2
            if not device_grids:
                log.info("part grids (%d MiB) stay on the host: %d MiB free on %s",
                         need >> 20, free >> 20, device)  # fmt: skip
        return cls(index, DeviceSearch(index, device, bool(device_grids)))

    def search(
        self, queries: np.ndarray, k: int, where: LabelFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The coarse search (:data:`service.search.SearchFunction`); call it under the lock."""
        if self.device_search is not None:
            return self.device_search.search(queries, k, *self.index.selection(where))
        return self.index.search(queries, k, where)

    def version(self) -> Hashable:
        """What names the gallery's state: the changes made here and (for a collection that
        other replicas write to) the count. Item ids are never reused for other pictures."""
        return self.changes, self.index.count

    @contextlib.contextmanager
    def unchanged(self, version: Hashable) -> Iterator[None]:
        """The lock, while the gallery is still at ``version`` (else GalleryChangedError)."""
        with self.lock:
            if self.version() != version:
                raise GalleryChangedError
            yield

    def item(self, item_id: int) -> Item:
        """A live item's record; NotFoundError when there is none."""
        with self.lock:
            item = self.index.items([item_id]).get(item_id)
        if item is None:
            raise NotFoundError(f"no gallery item with id {item_id}")
        return item

    def items(self, ids: list[int] | np.ndarray) -> dict[int, Item]:
        """The live items among ``ids``, by id."""
        with self.lock:
            return self.index.items(ids)

    def labels(self) -> list[tuple[str, int]]:
        """Every label of a live item and its number of items, most common first."""
        with self.lock:
            return self.index.labels()

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        """Up to ``limit`` live items in id order from ``offset``, and the number of items."""
        with self.lock:
            return self.index.page(offset, limit), self.index.count

    def stored(self, item_id: int) -> tuple[Embedding, Item]:
        """A live item's stored embedding (length 1) and record; NotFoundError when unknown."""
        with self.lock:
            item = self.item(item_id)
            ids = np.array([item_id])
            parts = torch.from_numpy(self.index.grids(ids).astype(np.float32))
            vector = torch.from_numpy(self.index.vectors(ids))
        return Embedding(parts, vector), item
