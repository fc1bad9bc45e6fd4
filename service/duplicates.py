"""Near-duplicate groups of the gallery, from a neighbour graph cached between requests
(:mod:`index_builder.duplicates`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import Callable

import torch

from index_builder.duplicate_groups import DuplicateGroups
from index_builder.duplicates import NEIGHBOURS, NeighbourGraph, match_graph, neighbour_graph
from model import MatchingConfig
from service.gallery import Gallery, again_if_changed
from service.limits import check_deadline, in_thread


class DuplicateFinder:
    """The neighbour graph of ``gallery``, its one update at a time (on its own thread,
    awaited from any event loop) and the last grouping."""

    def __init__(
        self, gallery: Gallery, matching: Callable[[], MatchingConfig], device: torch.device
    ) -> None:
        """``matching()``: the matching configuration to match pairs with, when they are."""
        self.gallery, self.matching, self.device = gallery, matching, device
        self._graph: NeighbourGraph | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "diml-duplicates")
        self._update: concurrent.futures.Future[None] | None = None
        self._start = threading.Lock()
        self._groups: tuple[tuple[object, ...], DuplicateGroups] | None = None

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    async def groups(self, threshold: float, structural_threshold: float) -> DuplicateGroups:
        """The gallery's groups of near-copies: other thresholds cost a grouping of the cached
        pairs, a change of the gallery a new neighbour search and the match of the new pairs.

        The index lock is held for one batch of reads at a time, never for the matching, so
        that reads go on meanwhile. One update of the graph runs at a time, on a thread of its
        own, within the deadline of the request that started it (it stops at the end of the
        batch under way; what it matched is kept); other requests await it without holding a
        thread, then answer from it or start the next update."""
        while True:
            groups = await in_thread(self._now, threshold, structural_threshold)
            if groups is not None:
                return groups
            update, started_here = self._update_for(threshold)
            waiting = asyncio.wrap_future(update)
            # Its outcome counts as seen also when this request gives up before it ends.
            waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
            try:
                await asyncio.shield(waiting)
            except Exception:
                if started_here:  # its failure (the deadline) is this request's
                    raise

    def _update_for(self, threshold: float) -> tuple[concurrent.futures.Future[None], bool]:
        """The update under way, or a new one (True) that matches down to ``threshold`` within
        this request's deadline."""
        with self._start:
            if self._update is None or self._update.done():
                context = contextvars.copy_context()  # the deadline goes with it
                self._update = self._worker.submit(context.run, self._update_graph, threshold)
                return self._update, True
            return self._update, False

    def _now(self, threshold: float, structural_threshold: float) -> DuplicateGroups | None:
        """The groups from the graph as it is; None when it must be updated first (the gallery
        changed, or pairs proposed at ``threshold`` are not matched yet)."""
        graph = self._graph
        if graph is None or graph.version != self.gallery.version():
            return None
        if not graph.answers(threshold):
            return None
        key = (graph, threshold, structural_threshold)
        last = self._groups
        if last is None or last[0] != key:
            last = self._groups = (key, graph.groups(threshold, structural_threshold))
        return last[1]

    def _update_graph(self, threshold: float) -> None:
        """Bring the graph to the gallery's version and match it down to ``threshold``,
        publishing it after every batch; again (from what was kept) when the gallery changes
        meanwhile."""
        gallery = self.gallery

        def update() -> None:
            version = gallery.version()
            hold = functools.partial(gallery.unchanged, version)
            graph = self._graph
            if graph is None or graph.version != version:
                graph = neighbour_graph(
                    gallery.index, NEIGHBOURS, version, graph, hold, check_deadline
                )
                self._graph = graph
            for matched in match_graph(graph, gallery.index, self.matching(), threshold, hold,
                                       check_deadline, self.device):  # fmt: skip
                self._graph = matched

        again_if_changed(update)
