"""The search engine: one model and one index, shared by every request.

Images from concurrent requests are embedded together by a :class:`MicroBatcher` (one thread
owns the backbone; it waits a short window for company, up to a batch limit); a full queue
refuses with ``OverloadedError`` instead of making callers wait without bound; their searches
are batched the same way by a :class:`SearchBatcher`. A search runs the named stages of
:mod:`service.search` (coarse search, gather, re-rank, rank, explain): the first two hold the
index lock, the rest run on copies, outside it, and each is timed. Results are plain values
(:class:`service.search.Hit`) and failures the kinds in :mod:`service.failures`;
``service.errors`` and the routes turn them into HTTP statuses and JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import hashlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, ParamSpec, TypeVar

import numpy as np
import torch
from PIL import Image

from index_builder import IndexBusyError, Item, LabelFilter, Source
from index_builder.build import Embedded, add_embedded
from index_builder.device_search import DeviceSearch
from index_builder.duplicates import (
    NEIGHBOURS,
    DuplicateGroups,
    NeighbourGraph,
    match_graph,
    neighbour_graph,
)
from index_builder.files import write_atomic, writer_lock
from index_builder.location import QdrantLocation
from index_builder.opening import open_index
from model import (
    Embedder,
    Embedding,
    Explanation,
    ImageGeometry,
    ImageLoadError,
    ModelInput,
    explain,
    fingerprint,
    load_for_model,
    load_model,
    preprocess,
)
from model.explain import bases_of
from model.images import DEFAULT_MAX_PIXELS, geometry_of
from model.matching import StructuralMatch, rerank_positions
from model.network import EmbeddingNet
from model.pipeline import explain_embeddings
from service.bases import BasisCache, query_bases, split_pages
from service.failures import (
    DeadlineExceededError,
    EmptyUploadError,
    NotFoundError,
    OverloadedError,
    ReadOnlyError,
    UnusableImageError,
)
from service.limits import BudgetExhaustedError, MemoryBudget, in_thread, time_left
from service.metrics import StageTimer
from service.search import (
    Hit,
    Page,
    SearchOptions,
    coarse_search,
    explain_hits,
    explain_page,
    gather,
    gather_shared,
    needed_positions,
    pick_pages,
    rank,
    rerank,
)
from service.settings import ALLOWED_FORMATS, Settings

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# model.files.replacing writes beside the file as .NAME.RANDOM.tmp, renamed when complete.
_UPLOAD_TEMP = re.compile(r"\.[0-9a-f]{64}\.[^/]*\.tmp")
GROUP_DEPTH = 4  # a grouped search first looks at this many candidates per hit it may return


def _check_deadline() -> float | None:
    """Seconds left to the current request (None without a deadline); raises past it."""
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceededError
    return left


Job = TypeVar("Job")
Result = TypeVar("Result")
T = TypeVar("T")
P = ParamSpec("P")


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

    def __init__(self, embedder: Embedder, max_batch: int, window_s: float, max_queue: int) -> None:
        self.embedder = embedder
        super().__init__(max_batch, window_s, max_queue)

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
    """Searches for concurrent requests together: one coarse search, one gathering of the
    candidates' grids and one structural match for every query of the batch."""

    name = "diml-search"

    def __init__(self, engine: Engine, max_batch: int, window_s: float, max_queue: int) -> None:
        self.engine = engine
        super().__init__(max_batch, window_s, max_queue, expect=lambda: engine.arriving)

    def size(self, job: SearchJob) -> int:
        return len(job.queries)

    def process(self, jobs: list[SearchJob]) -> list[list[Page]]:
        return self.engine.search_jobs(jobs)


class _GalleryChangedError(Exception):
    """Items a search found were deleted before their grids were read (the coarse search and
    the re-rank take the index lock apart, so that writers are not held up by the match)."""


def _again_if_changed(search: Callable[[], T], tries: int = 3) -> T:
    """``search()``, run again (it only reads) while the gallery changes under it."""
    for _ in range(tries - 1):
        try:
            return search()
        except _GalleryChangedError:
            log.info("the gallery changed during a search: searching again")
    try:
        return search()
    except _GalleryChangedError:
        raise OverloadedError("the gallery is changing too fast to search") from None


def _rerun_if_changed(search: Callable[P, T]) -> Callable[P, T]:
    """A search method run again (:func:`_again_if_changed`) while the gallery changes under it."""

    @functools.wraps(search)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return _again_if_changed(lambda: search(*args, **kwargs))

    return run


class Engine:
    """Model, index and batcher, loaded once per process."""

    def __init__(self, settings: Settings, model: EmbeddingNet | None = None) -> None:
        """``model``: the one ``settings.checkpoint`` names, when the caller loaded it already."""
        self.settings = settings
        device = torch.device(settings.device)
        self.model = model or load_model(settings.checkpoint, device=device)
        self.config = self.model.config
        self.fingerprint = fingerprint(self.model)
        self.embedder = Embedder(
            self.model, device, half=device.type == "cuda", runtime=settings.inference
        )
        self.lock = threading.RLock()
        self._exit = contextlib.ExitStack()
        self.writable = False
        location = settings.location
        # A folder has one writer (its lock); a Qdrant collection takes writes from every
        # replica of the API, and its uploads folder is shared, so it is never swept.
        folder = None if isinstance(location, QdrantLocation) else location
        if settings.allow_writes:
            try:
                if folder is not None:
                    self._exit.enter_context(writer_lock(folder, create=False))
                self.writable = True
            except IndexBusyError:
                log.warning("%s is locked by another writer: serving read-only", settings.index)
        self.index = open_index(location, self.fingerprint, writable=self.writable)
        if self.writable:
            self.index.recover()
            if folder is not None:
                self._sweep_uploads()
        use_device = settings.device_search
        if use_device is None:  # grids kept on the device come with device search
            use_device = device.type == "cuda" or bool(settings.device_grids)
        self.device_search = None
        if use_device:
            self.device_search = DeviceSearch(self.index, device, self._keep_grids(device))
        self.decode_budget = MemoryBudget(settings.decode_memory_mb * 2**20)
        self.bases = BasisCache(settings.basis_cache_mb * 2**20)
        # Requests embedded and about to search (changed on the event loop's thread only).
        self.arriving = 0
        self.changes = 0  # gallery changes since start: what cached answers are keyed on
        # Near-duplicates: the neighbour graph, its one update at a time (on its own thread,
        # awaited from any event loop), the last grouping.
        self._graph: NeighbourGraph | None = None
        self._graph_worker = concurrent.futures.ThreadPoolExecutor(1, "diml-duplicates")
        self._graph_update: concurrent.futures.Future[None] | None = None
        self._graph_start = threading.Lock()
        self._duplicate_groups: tuple[tuple[object, ...], DuplicateGroups] | None = None
        self.batcher = MicroBatcher(
            self.embedder,
            settings.max_batch_images,
            settings.batch_window_ms / 1000,
            settings.max_queue,
        )
        self.searcher = SearchBatcher(
            self, settings.max_batch_queries, settings.batch_window_ms / 1000, settings.max_queue
        )

    def _keep_grids(self, device: torch.device) -> bool:
        """Whether the part grids stay on ``device`` (``settings.device_grids``; by default on
        CUDA when they take at most half of its free memory, leaving room for adds)."""
        if self.settings.device_grids is not None:
            return self.settings.device_grids
        if device.type != "cuda":
            return False
        need, free = DeviceSearch.grid_bytes(self.index), torch.cuda.mem_get_info(device)[0]
        if need > free // 2:
            log.info("part grids (%d MiB) stay on the host: %d MiB free on %s",
                     need >> 20, free >> 20, device)  # fmt: skip
            return False
        return True

    def close(self) -> None:
        self.batcher.close()
        self.searcher.close()
        self._graph_worker.shutdown(wait=True, cancel_futures=True)
        with self.lock:
            if self.writable and self.index.backlog():
                self.index.snapshot()
            self.index.close()
        self._exit.close()

    # -- decoding and embedding ----------------------------------------------------------------

    def decode(self, data: bytes, name: str = "image") -> ModelInput:
        """Bytes of an upload -> pixels and geometry. Raises EmptyUploadError or
        UnusableImageError when they are not a usable image (the message never includes a
        server path), OverloadedError when the decoding memory budget stays full, and
        DeadlineExceededError when the request's deadline passes before decoding could start."""
        if not data:
            raise EmptyUploadError(f"{name}: the upload is empty; send an image file")
        try:
            return self._decode_within_budget(
                data, self.settings.max_pixels, ALLOWED_FORMATS, self.settings.max_aspect_ratio
            )
        except ImageLoadError as e:
            raise UnusableImageError(e.kind, f"{name}: {e.reason}") from e

    def stored_picture(self, item: Item) -> Image.Image:
        """A gallery item's picture as the model saw it (to draw an explanation): the picture of
        :meth:`stored_input`."""
        return self.stored_input(item).picture

    def stored_input(self, item: Item) -> ModelInput:
        """A gallery item's picture decoded for the model again, within the same budget as
        uploads: readers may ask for it many times at once. NotFoundError when its file is gone
        or no longer decodes; OverloadedError and DeadlineExceededError as :meth:`decode`. The
        file was accepted once, by the index builder or by an add through this service: the
        limits are the looser of both's, and any format and aspect ratio."""
        gone = NotFoundError(f"the image of gallery item {item.id} is no longer available")
        max_pixels = max(DEFAULT_MAX_PIXELS, self.settings.max_pixels)
        try:
            data = Path(item.path or "").read_bytes()
            return self._decode_within_budget(data, max_pixels, None, None)
        except (OSError, ImageLoadError):
            raise gone from None

    async def item_bases(self, items: list[Item]) -> dict[int, torch.Tensor | None]:
        """Each item's global basis (R, D) (:mod:`model.attribution`), from the cache or by
        embedding its stored picture again through the shared batcher; None for an item whose
        picture is gone."""
        out: dict[int, torch.Tensor | None] = {}
        missing: list[tuple[Item, ModelInput]] = []
        for item in {item.id: item for item in items}.values():
            out[item.id] = self.bases.get(item)
            if out[item.id] is None:
                try:
                    missing.append((item, await in_thread(self.stored_input, item)))
                except NotFoundError:
                    log.info("gallery item %d: picture gone, its global term is not split", item.id)
        step = self.settings.max_batch_images
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            embedding = await self.embed([decoded for _, decoded in chunk])
            bases = bases_of(embedding, self.config.grid)
            assert bases is not None  # the batcher keeps the maps
            for (item, _), basis in zip(chunk, bases.float(), strict=True):
                self.bases.put(item, basis)
                out[item.id] = basis
        return out

    async def split_global(
        self,
        pages: list[Page],
        queries: Embedding,
        stored: list[torch.Tensor | None] | None = None,
    ) -> list[Page]:
        """``pages`` (page b answering ``queries[b]``) with their explanations' global term split
        over both images' regions (:func:`service.bases.split_pages`); ``stored``: the bases of
        queries that are gallery items (:meth:`stored_query`)."""
        items = [h.item for page in pages for h in page.hits if h.explanation is not None]
        if not items:
            return pages
        item_bases = await self.item_bases(items)
        ids = np.array(sorted(item_bases), dtype=np.int64)
        with self.lock:
            try:
                found = self.index.vectors(ids)
            except KeyError:  # an item deleted since the search is left unsplit, not an error
                ids = np.array(sorted(self.index.items(ids)), dtype=np.int64)
                found = self.index.vectors(ids)
        vectors = dict(zip(ids.tolist(), found, strict=True))
        bases = query_bases(queries, self.config.grid, stored)
        return split_pages(pages, queries, bases, item_bases, vectors)

    async def stored_query(
        self, item_id: int
    ) -> tuple[Embedding, ImageGeometry, Item, torch.Tensor | None]:
        """:meth:`stored`, and the item's global basis (None where its picture is gone)."""
        embedding, geometry, item = await in_thread(self.stored, item_id)
        return embedding, geometry, item, (await self.item_bases([item]))[item.id]

    def _decode_within_budget(
        self, data: bytes, max_pixels: int, formats: frozenset[str] | None, max_aspect: float | None
    ) -> ModelInput:
        left = _check_deadline()
        wait = self.settings.request_timeout_s if left is None else left
        try:
            return load_for_model(
                data,
                self.config.preprocessing,
                max_pixels,
                formats,
                max_aspect,
                reserve=functools.partial(self.decode_budget.reserve, timeout=wait),
            )
        except BudgetExhaustedError:
            _check_deadline()
            raise OverloadedError("too many large images are being decoded") from None

    async def embed(self, queries: list[ModelInput], search_next: bool = False) -> Embedding:
        """Embed through the shared batcher, unless the request's deadline has passed. The
        deadline cancelling this await also cancels the job, which the batcher then skips.

        ``search_next``: the caller calls :meth:`find` with ``embedded=True`` right after, so
        the search batcher waits for it (queries embedded in one batch are searched in one)."""
        _check_deadline()
        embedding = await asyncio.wrap_future(
            self.batcher.submit(torch.stack([q.pixels for q in queries]))
        )
        if search_next:
            self.arriving += 1
        return embedding

    # -- search ------------------------------------------------------------------------------

    def item(self, item_id: int) -> Item:
        """A live gallery item's record; NotFoundError when there is none."""
        with self.lock:
            item = self.index.items([item_id]).get(item_id)
        if item is None:
            raise NotFoundError(f"no gallery item with id {item_id}")
        return item

    def items(self, ids: list[int]) -> dict[int, Item]:
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

    @property
    def count(self) -> int:
        return self.index.count

    @property
    def grids_on_device(self) -> bool:
        return self.device_search is not None and self.device_search.part_grids is not None

    def stored(self, item_id: int) -> tuple[Embedding, ImageGeometry, Item]:
        """A gallery item's stored embedding, geometry and record; NotFoundError when unknown."""
        with self.lock:
            item = self.item(item_id)
            ids = np.array([item_id])
            parts = torch.from_numpy(self.index.grids(ids).astype(np.float32))
            vector = torch.from_numpy(self.index.vectors(ids))
        return Embedding(parts, vector), self.geometry(item), item

    def geometry(self, item: Item) -> ImageGeometry:
        return geometry_of(item.width, item.height, self.config.preprocessing)

    async def find(
        self,
        queries: Embedding,
        geometries: list[ImageGeometry],
        options: SearchOptions,
        timer: StageTimer,
        embedded: bool = False,
    ) -> list[Page]:
        """:meth:`search_jobs` through the shared search batcher, so that concurrent requests are
        searched and re-ranked together; the deadline cancelling this await cancels the job.
        ``embedded``: the queries come from ``embed(..., search_next=True)``."""
        try:
            _check_deadline()
            job = SearchJob(queries, geometries, options, timer)
            future = self.searcher.submit(job)
        finally:
            if embedded:
                self.arriving = max(0, self.arriving - 1)
        return await asyncio.wrap_future(future)

    def search_jobs(self, jobs: list[SearchJob]) -> list[list[Page]]:
        """The queries of several requests, searched together through the stages of
        :mod:`service.search`: one coarse search by the global vector per distinct label
        filter, one gathering of the candidates' grids and one structural match for the whole
        batch. Each query's ranking is the two-stage rule (:func:`service.search.rank`): its
        top ``rerank_k`` by score = global + weight x structural, the rest in global order; a
        page is a slice of that ranking, so pages continue each other exactly. Every hit's
        score is the same formula, re-ranked or not. The match stays on the model's device:
        only its scores and the pages' pairs leave it. Each request's timer gets the shared
        stages' time and its own explanations' time.

        Only the candidates a ranking needs are matched: the re-ranked head and the page. With
        weight 0 (the training-free default model) re-ranking cannot change the order, so only
        the page is.
        """
        reorders = self.config.matching.structural_weight != 0
        options = [j.options for j in jobs for _ in range(len(j.queries))]
        # One more than the page tells whether a next page exists.
        depth = max(max(o.offset + o.k + 1, o.rerank_k if reorders else 0) for o in options)
        queries = Embedding.cat([j.queries for j in jobs]) if len(jobs) > 1 else jobs[0].queries
        times = [time.perf_counter()]
        with self.lock:
            filters = [o.where for o in options]
            candidates = coarse_search(self._search, queries.vector.numpy(), filters, depth)
            times.append(time.perf_counter())
            needed = [needed_positions(o, int(n), reorders)
                      for o, n in zip(options, candidates.counts, strict=True)]  # fmt: skip
            gathered = gather(self.index, candidates, needed, self.device_search)
            times.append(time.perf_counter())
        if gathered is not None:
            match = rerank(queries, gathered, self.config, self.embedder.device)
            ranking = rank(match, gathered, candidates, options, reorders)
            pairs = pick_pages(match, gathered, ranking)
        times.append(time.perf_counter())
        pages, b = [], 0
        for job in jobs:
            for stage, seconds in zip(("coarse_search", "gather", "rerank"), np.diff(times),
                                      strict=True):  # fmt: skip
                job.timer.add(stage, float(seconds))
            o, end = job.options, job.options.offset + job.options.k
            answers = []
            with job.timer.stage("explain"):
                for geometry in job.geometries:
                    hits = [] if gathered is None else explain_page(
                        pairs, b, ranking, gathered.items, geometry, o, self.config)  # fmt: skip
                    more = end if candidates.counts[b] > end else None
                    answers.append(Page(hits, o.offset, more))
                    b += 1
            pages.append(answers)
        return pages

    def _search(
        self, queries: np.ndarray, k: int, where: LabelFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.device_search is not None:
            return self.device_search.search(queries, k, *self.index.selection(where))
        return self.index.search(queries, k, where)

    def _match(self, queries: Embedding, ids: np.ndarray, timer: StageTimer) -> StructuralMatch:
        """Every query against the same gallery items ``ids``: a StructuralMatch over
        (len(queries), len(ids)) on the CPU, the candidates' grids read once and shared."""
        with timer.stage("gather"), self.lock:
            try:
                gathered = gather_shared(self.index, ids, self.device_search)
            except KeyError as e:  # deleted since the coarse search found it
                raise _GalleryChangedError from e
        with timer.stage("rerank"):
            return rerank(queries, gathered, self.config, self.embedder.device).to("cpu")

    @_rerun_if_changed
    def search_grouped(
        self, query: Embedding, geometry: ImageGeometry, options: SearchOptions, timer: StageTimer
    ) -> Page:
        """One query's ranking (the same two-stage rule as :meth:`search_jobs`) grouped by
        label: groups in the order of their best hit, each with its best ``group_size`` hits;
        ``k`` groups from group ``offset``. Items without a label form one group (label None).

        The ranking is walked until the groups asked for are full; when the candidates run out
        first and the gallery holds more, the coarse search is repeated four times deeper.
        """
        size = options.group_size or 1
        want = options.offset + options.k + 1  # groups; one more tells whether more exist
        reorders = self.config.matching.structural_weight != 0
        head_k = options.rerank_k if reorders else 0
        depth = max(head_k, 1, int(GROUP_DEPTH * want * size))
        while True:
            _check_deadline()
            with timer.stage("coarse_search"), self.lock:
                found = coarse_search(self._search, query.vector.numpy(), [options.where], depth)
                ids = found.ids[0][: found.counts[0]]
                items = self.index.items(ids)
                total = self.index.count
            head = min(head_k, len(ids))
            ranking = np.arange(len(ids))
            if head:
                match = self._match(query, ids[:head], timer)
                order = rerank_positions(match.score, head)[0].numpy()
                ranking = np.r_[order, ranking[head:]]
            groups: dict[str | None, list[int]] = {}
            for position in ranking.tolist():
                item = items.get(int(ids[position]))
                if item is None:  # removed since the search
                    continue
                label = item.label
                if label not in groups:
                    if len(groups) == want:
                        continue
                    groups[label] = []
                if len(groups[label]) < size:
                    groups[label].append(position)
                    if len(groups) == want and all(len(g) == size for g in groups.values()):
                        break
            else:  # the candidates ran out before the groups were full
                if len(ids) == depth and depth < total:
                    depth *= 4
                    continue
            break
        chosen = list(groups.items())[options.offset : options.offset + options.k]
        positions = sorted({p for _, members in chosen for p in members})
        if not positions:
            return Page([], options.offset, None, [])
        if head and positions[-1] < head:  # all in the re-ranked head: matched already
            column, candidates = np.arange(len(ids)), ids[:head]
        else:
            match = self._match(query, ids[positions], timer)
            column = np.full(len(ids), -1, dtype=np.int64)
            column[positions] = np.arange(len(positions))
            candidates = ids[positions]
        out: list[tuple[str | None, list[Hit]]] = []
        with timer.stage("explain"):
            for label, members in chosen:
                cols = column[members].tolist()
                hits = explain_hits(match, 0, cols, members, candidates[cols], items, geometry,
                                    options, self.config)  # fmt: skip
                if hits:
                    out.append((label, hits))
        end = options.offset + options.k
        more = end if len(groups) > end else None
        return Page([h for _, hits in out for h in hits], options.offset, more, out)

    @_rerun_if_changed
    def search_examples(
        self,
        positives: Embedding,
        positive_geometries: list[ImageGeometry],
        negatives: Embedding | None,
        exclude: list[int],
        options: SearchOptions,
        timer: StageTimer,
    ) -> Page:
        """More like the positives, less like the negatives.

        Candidates: the union of each positive's top ``rerank_k`` (at least 1) by the global
        vector (within ``options.where``), less the gallery items given as examples
        (``exclude``); the same for every page, so pages continue one ranking. Every
        candidate c is matched with every example e in one structural match,
        ``s(e, c) = global + w x structural``, and ranked by

            score(c) = max over positives s(p, c) - max over negatives s(n, c)

        (no negatives: the second term is 0): like any of the positives, unlike all of the
        negatives. Best first, ties in id order. A hit's global and structural terms and its
        explanation are those of the positive it matches best (``Hit.positive``: its position
        among the positives).
        """
        n_pos = len(positives)
        examples = positives if negatives is None else Embedding.cat([positives, negatives])
        depth = max(options.rerank_k, 1)
        with timer.stage("coarse_search"), self.lock:
            filters = [options.where] * n_pos
            found = coarse_search(self._search, positives.vector.numpy(), filters, depth).ids
            ids = np.setdiff1d(np.unique(found[found >= 0]), np.asarray(exclude, np.int64))
            if len(ids) == 0:
                return Page([], options.offset, None)
            items = self.index.items(ids)
        match = self._match(examples, ids, timer)
        start = time.perf_counter()
        liked, best = match.score[:n_pos].max(dim=0)
        disliked = match.score[n_pos:].amax(dim=0) if len(examples) > n_pos else 0.0
        score = liked - disliked
        order = torch.sort(score, descending=True, stable=True).indices  # ids ascend: ties by id
        closeness = torch.argsort(match.global_similarity[:n_pos].mean(dim=0), descending=True)
        global_rank = torch.empty_like(closeness)
        global_rank[closeness] = torch.arange(len(closeness))
        timer.add("rerank", time.perf_counter() - start)
        hits = []
        with timer.stage("explain"):
            for c in order[options.offset : options.offset + options.k].tolist():
                if options.min_score is not None and float(score[c]) < options.min_score:
                    continue
                p = int(best[c])
                explanation = None
                if options.explain:
                    explanation = explain(
                        match, positive_geometries[p], self.geometry(items[int(ids[c])]),
                        self.config.grid, self.config.matching, index=(p, c),
                        top=options.matches,
                    )  # fmt: skip
                hits.append(Hit(items[int(ids[c])], float(score[c]),
                                float(match.global_similarity[p, c]),
                                float(match.structural_similarity[p, c]), True,
                                int(global_rank[c]) + 1, explanation, positive=p))  # fmt: skip
        end = options.offset + options.k
        return Page(hits, options.offset, end if len(ids) > end else None)

    def explain_pair(
        self,
        a: Embedding,
        ga: ImageGeometry,
        b: Embedding,
        gb: ImageGeometry,
        top: int,
        bases: tuple[torch.Tensor | None, torch.Tensor | None],
    ) -> Explanation:
        """How ``b`` matches ``a`` (each of length 1), the global term split with ``bases``."""
        return explain_embeddings(a, ga, b, gb, self.config, top, bases)

    async def duplicates(self, threshold: float, structural_threshold: float) -> DuplicateGroups:
        """The gallery's groups of near-copies, from the cached neighbour graph
        (:mod:`index_builder.duplicates`): other thresholds cost a grouping of the cached pairs,
        a change of the gallery a new neighbour search and the match of the new pairs only.

        The index lock is held for one batch of reads at a time, never for the matching, so
        that reads go on meanwhile. One update of the graph runs at a time, on a thread of its
        own, within the deadline of the request that started it (it stops at the end of the
        batch under way; what it matched is kept); other requests await it without holding a
        thread, then answer from it or start the next update."""
        while True:
            groups = await in_thread(self._duplicates_now, threshold, structural_threshold)
            if groups is not None:
                return groups
            update, started_here = self._graph_update_for(threshold)
            waiting = asyncio.wrap_future(update)
            # Its outcome counts as seen also when this request gives up before it ends.
            waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
            try:
                await asyncio.shield(waiting)
            except Exception:
                if started_here:  # its failure (the deadline) is this request's
                    raise

    def _graph_update_for(self, threshold: float) -> tuple[concurrent.futures.Future[None], bool]:
        """The update under way, or a new one (True) that matches down to ``threshold`` within
        this request's deadline."""
        with self._graph_start:
            if self._graph_update is None or self._graph_update.done():
                context = contextvars.copy_context()  # the deadline goes with it
                self._graph_update = self._graph_worker.submit(
                    context.run, self._update_graph, threshold
                )
                return self._graph_update, True
            return self._graph_update, False

    def _duplicates_now(
        self, threshold: float, structural_threshold: float
    ) -> DuplicateGroups | None:
        """The groups from the graph as it is; None when it must be updated first (the gallery
        changed, or pairs proposed at ``threshold`` are not matched yet)."""
        graph = self._graph
        if graph is None or graph.version != self._version() or not graph.answers(threshold):
            return None
        key = (graph, threshold, structural_threshold)
        last = self._duplicate_groups
        if last is None or last[0] != key:
            last = self._duplicate_groups = (key, graph.groups(threshold, structural_threshold))
        return last[1]

    def _update_graph(self, threshold: float) -> None:
        """Bring the graph to the gallery's version and match it down to ``threshold``,
        publishing it after every batch; again (from what was kept) when the gallery changes
        meanwhile."""

        def update() -> None:
            version = self._version()
            hold = functools.partial(self._unchanged, version)
            graph = self._graph
            if graph is None or graph.version != version:
                graph = neighbour_graph(
                    self.index, NEIGHBOURS, version, graph, hold, _check_deadline
                )
                self._graph = graph
            for matched in match_graph(graph, self.index, self.config.matching, threshold, hold,
                                       _check_deadline, self.embedder.device):  # fmt: skip
                self._graph = matched

        _again_if_changed(update)

    def _version(self) -> Hashable:
        """What names the gallery's state: the changes made here and (for a collection that
        other replicas write to) the count. Item ids are never reused for other pictures."""
        return self.changes, self.index.count

    @contextlib.contextmanager
    def _unchanged(self, version: Hashable) -> Iterator[None]:
        """The index lock, while the gallery is still at ``version``."""
        with self.lock:
            if self._version() != version:
                raise _GalleryChangedError
            yield

    # -- gallery changes -----------------------------------------------------------------------

    async def add(
        self, uploads: list[tuple[str, bytes]], key: str | None, label: str | None
    ) -> tuple[list[Item], list[dict[str, str]], int]:
        """Add uploads to the gallery: all or nothing. Returns (added items, skipped, count).

        Every upload is decoded once, then embedded through the shared batcher, a batch at a
        time, so searches keep their turn; the index lock is taken only to commit. One upload
        that is not a usable image refuses the whole request (its error names it) and
        nothing is written; bytes already in the gallery (or repeated) are skipped and listed.
        """
        if not self.writable:
            raise ReadOnlyError
        embedded: list[tuple[ModelInput, np.ndarray, np.ndarray]] = []
        step = self.settings.max_batch_images
        for start in range(0, len(uploads), step):
            chunk = uploads[start : start + step]
            inputs = [await in_thread(self.decode, data, name) for name, data in chunk]
            embedding = await self.embed(inputs)
            vectors, grids = embedding.vector.numpy(), embedding.parts.half().numpy()
            embedded += zip(inputs, vectors, grids, strict=True)
        return await in_thread(self._commit, uploads, embedded, key, label)

    def _commit(
        self,
        uploads: list[tuple[str, bytes]],
        embedded: list[tuple[ModelInput, np.ndarray, np.ndarray]],
        key: str | None,
        label: str | None,
    ) -> tuple[list[Item], list[dict[str, str]], int]:
        """Keep each new upload's bytes under ``uploads/<sha256>`` and add them in one step.
        Bytes already in the gallery get no file; the files this call wrote are deleted again
        when the add fails."""
        folder = self.settings.uploads_dir
        folder.mkdir(parents=True, exist_ok=True)
        shas = [hashlib.sha256(data).hexdigest() for _, data in uploads]
        ready, written = [], []
        with self.lock:
            known = self.index.keys_by_sha256(shas)  # skipped by the add: no file
            try:
                for i, ((name, data), sha, (decoded, vector, grid)) in enumerate(
                    zip(uploads, shas, embedded, strict=True)
                ):
                    path = folder / sha
                    if sha not in known and not path.exists():
                        write_atomic(path, data)
                        written.append(path)
                    item_key = key if key and len(uploads) == 1 else (f"{key}-{i}" if key else name)
                    size = decoded.geometry.width, decoded.geometry.height
                    ready.append(Embedded(Source(path, item_key, label), sha, *size, vector, grid))
                report = add_embedded(self.index, ready)
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            if self.device_search is not None:
                self.device_search.add(report.ids)
            self.changes += 1
            added = self.index.items(report.ids)
            count = self.index.count
        names = {str(folder / sha): name for (name, _), sha in zip(uploads, shas, strict=True)}
        skipped = [{"filename": names.get(s["path"], ""), "reason": s["reason"]}
                   for s in report.skipped]  # fmt: skip
        return [added[i] for i in report.ids], skipped, count

    def _sweep_uploads(self) -> None:
        """Delete files under ``uploads/`` that no live item holds: an add killed between
        writing its files and committing, or items removed since."""
        folder = self.settings.uploads_dir
        if not folder.is_dir():
            return
        for f in folder.iterdir():  # an upload's atomic write cut short (kill -9)
            if f.is_file() and _UPLOAD_TEMP.fullmatch(f.name):
                log.info("removing %s: an upload's write that never finished", f)
                f.unlink(missing_ok=True)
        files = [f for f in folder.iterdir() if f.is_file() and _SHA256.fullmatch(f.name)]
        live = self.index.keys_by_sha256(f.name for f in files)
        for f in files:  # only files this service wrote: named by the sha256 of their bytes
            if f.name not in live and hashlib.sha256(f.read_bytes()).hexdigest() == f.name:
                log.info("removing %s: no gallery item holds it", f)
                f.unlink(missing_ok=True)

    def remove(self, item_id: int) -> int:
        if not self.writable:
            raise ReadOnlyError
        with self.lock:
            if not self.index.remove([item_id]):
                raise NotFoundError(f"no gallery item with id {item_id}")
            if self.device_search is not None:
                self.device_search.remove([item_id])
            self.changes += 1
            return self.index.count

    def canary(self) -> None:
        """One real search end to end; raises when the engine cannot serve."""
        spec = self.config.preprocessing
        blank, _ = preprocess(Image.new("RGB", (spec.crop, spec.crop), (128, 128, 128)), spec)
        embedding = self.batcher.submit(blank[None]).result(timeout=120)
        with self.lock:
            self._search(embedding.vector.numpy(), 1)
