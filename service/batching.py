"""Batchers: the jobs of concurrent requests, run together on one thread.

A :class:`MicroBatcher` owns the backbone (one batch of images at a time), a
:class:`SearchBatcher` the search (one coarse search, gathering and structural match for the
queries of several requests). Each waits a short window for company, up to a batch limit; a
full queue refuses with ``OverloadedError`` instead of making callers wait without bound.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from model import Embedder, Embedding, ImageGeometry
from service.failures import OverloadedError
from service.metrics import StageTimer
from service.search import Page, SearchOptions

Job = TypeVar("Job")
Result = TypeVar("Result")


class Batcher(Generic[Job, Result]):
    """Runs the jobs of concurrent requests together, on one thread: it takes a job, waits up
    to ``window_s`` for company up to ``max_batch`` units of work, and hands the batch to
    :meth:`process`. A full queue refuses with OverloadedError; a job whose request gave up
    (its future cancelled) is skipped; a failure of the batch goes to each of its requests."""

    name = "diml-batcher"

    def __init__(
        self,
        max_batch: int,
        window_s: float,
        max_queue: int,
        expect: Callable[[], int] | None = None,
    ) -> None:
        """``expect``, when given, says how many jobs are on their way: the batcher waits for
        company only while some are (and never past the window)."""
        self.max_batch, self.window_s, self.expect = max_batch, window_s, expect
        self.jobs: queue.Queue[tuple[Job, concurrent.futures.Future[Result]] | None]
        self.jobs = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def size(self, job: Job) -> int:
        return 1

    def process(self, jobs: list[Job]) -> list[Result]:
        raise NotImplementedError

    def submit(self, job: Job) -> concurrent.futures.Future[Result]:
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        try:
            self.jobs.put_nowait((job, future))
        except queue.Full:
            raise OverloadedError() from None
        return future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while (first := self.jobs.get()) is not None:
            batch = [first]
            size = self.size(first[0])
            deadline = time.perf_counter() + self.window_s
            while size < self.max_batch:
                if self.expect is not None and self.expect() <= 0 and self.jobs.empty():
                    break  # no job is on its way: do not wait for company
                try:
                    more = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)
                    break
                batch.append(more)
                size += self.size(more[0])
            self._process(batch)

    def _process(self, batch: list[tuple[Job, concurrent.futures.Future[Result]]]) -> None:
        # A request that gave up (its deadline passed) cancelled its future: skip it. Once
        # marked running, a future can no longer be cancelled, so set_result below is safe.
        batch = [(job, f) for job, f in batch if f.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            results = self.process([job for job, _ in batch])
        except Exception as e:  # handed to every waiting request, which answers 500
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)


class MicroBatcher(Batcher[torch.Tensor, Embedding]):
    """Runs the backbone for concurrent requests in shared batches: a job is (n, 3, H, W)
    pixels, its result the Embedding of its n images."""

    name = "diml-embed"

    def __init__(
        self,
        embedder: Embedder,
        max_batch: int,
        window_s: float,
        max_queue: int,
        expect: Callable[[], int] | None = None,
    ) -> None:
        """``expect``: how many requests are decoding images for it (see :class:`Batcher`); a
        lone request then goes straight to the backbone instead of waiting out the window."""
        self.embedder = embedder
        super().__init__(max_batch, window_s, max_queue, expect)

    def size(self, job: torch.Tensor) -> int:
        return len(job)

    def process(self, jobs: list[torch.Tensor]) -> list[Embedding]:
        # The projected maps come along: explanations split the global term with them.
        embedding = self.embedder.embed_pixels(torch.cat(jobs), keep_maps=True).to("cpu")
        out, start = [], 0
        for pixels in jobs:
            out.append(embedding[start : start + len(pixels)])
            start += len(pixels)
        return out


@dataclass(frozen=True)
class SearchJob:
    """The queries of one request, embedded, with their geometries, options and stage timer."""

    queries: Embedding
    geometries: list[ImageGeometry]
    options: SearchOptions
    timer: StageTimer


class SearchBatcher(Batcher[SearchJob, list[Page]]):
    """Searches for concurrent requests together: ``search`` gets every job of a batch and
    answers each with its queries' pages."""

    name = "diml-search"

    def __init__(
        self,
        search: Callable[[list[SearchJob]], list[list[Page]]],
        expect: Callable[[], int],
        max_batch: int,
        window_s: float,
        max_queue: int,
    ) -> None:
        self.search = search
        super().__init__(max_batch, window_s, max_queue, expect=expect)

    def size(self, job: SearchJob) -> int:
        return len(job.queries)

    def process(self, jobs: list[SearchJob]) -> list[list[Page]]:
        return self.search(jobs)
