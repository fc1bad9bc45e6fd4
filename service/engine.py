"""The engine: one model and one gallery, shared by every request; a facade with one call per
route over the modules that do the work:

    service.decoding    decode uploads and stored pictures within a memory budget
    service.batching    the batchers that own the backbone and the search
    service.searching   the three searches, through the stages of service.search and
                        service.ranking (the one ranking rule)
    service.bases       the global term of explanations split over regions
    service.duplicates  near-duplicate groups
    service.writes      adds and removals
    service.gallery     the index behind its lock

Results are plain values (:class:`service.search.Page`) and failures the kinds in
:mod:`service.failures`; ``service.errors`` and the routes turn them into HTTP statuses and
JSON. Tests that need to act between two stages of a search give the request a
:class:`service.metrics.StageTimer` with a ``before`` hook (override ``get_timer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import torch
from PIL import Image

from index_builder import Item
from index_builder.duplicate_groups import DuplicateGroups
from model import (
    Embedder,
    Embedding,
    Explanation,
    ImageGeometry,
    ModelInput,
    fingerprint,
    load_model,
    preprocess,
)
from model.config import ModelConfig
from model.explain import bases_of
from model.network import EmbeddingNet
from model.pipeline import explain_embeddings
from model.preprocessing import geometry_of
from service.bases import Bases, BasisCache, GlobalSplit
from service.batching import MicroBatcher, SearchBatcher, SearchJob
from service.decoding import Decoder
from service.duplicates import DuplicateFinder
from service.gallery import Gallery
from service.limits import check_deadline, in_thread
from service.metrics import StageTimer
from service.search import Page, SearchOptions
from service.searching import Retrieval
from service.settings import Settings
from service.writes import Added, Uploads, Writes, claim_writes

log = logging.getLogger(__name__)


class Engine:
    """Model, gallery and batchers, loaded once per process."""

    def __init__(self, settings: Settings, model: EmbeddingNet | None = None) -> None:
        """``model``: the one ``settings.checkpoint`` names, when the caller loaded it already."""
        self.settings = settings
        device = torch.device(settings.device)
        self.model = model or load_model(settings.checkpoint, device=device)
        config = self.model.config
        self.fingerprint = fingerprint(self.model)
        self.embedder = Embedder(
            self.model, device, half=device.type == "cuda", runtime=settings.inference
        )
        self._exit = contextlib.ExitStack()
        self.writable = claim_writes(settings, self._exit)
        self.gallery = Gallery.open(settings.location, self.fingerprint, self.writable, device,
                                    settings.device_search, settings.device_grids)  # fmt: skip
        self.index, self.device_search = self.gallery.index, self.gallery.device_search
        self.decoder = Decoder(settings, config.preprocessing)
        self.bases = BasisCache(settings.basis_cache_mb * 2**20)
        self.split = GlobalSplit(self.bases, self.gallery, config.grid,
                                 lambda item: self.stored_input(item), self.embed,
                                 settings.max_batch_images)  # fmt: skip
        self.retrieval = Retrieval(self.gallery, config, self.embedder.device)
        self.writes = Writes(self.gallery, settings, self.writable,
                             lambda data, name: self.decode(data, name), self.embed)  # fmt: skip
        if self.writable:
            self.writes.sweep_uploads()
        self.duplicate_finder = DuplicateFinder(
            self.gallery, lambda: self.config.matching, self.embedder.device
        )
        # Requests decoding (to embed next) and embedded (to search next): a batcher waits for
        # company only while some is on its way. Changed on the event loop's thread only.
        self.decoding = self.arriving = 0
        window = settings.batch_window_ms / 1000
        self.batcher = MicroBatcher(self.embedder, settings.max_batch_images, window,
                                    settings.max_queue, lambda: self.decoding)  # fmt: skip
        self.searcher = SearchBatcher(
            lambda jobs: self.search_jobs(jobs), lambda: self.arriving,
            settings.max_batch_queries, window, settings.max_queue,
        )  # fmt: skip

    @property
    def config(self) -> ModelConfig:
        """The model's configuration, as every search ranks and explains with it: assigning
        another (a test trying another structural weight) changes what they all use."""
        return self.retrieval.config

    @config.setter
    def config(self, config: ModelConfig) -> None:
        self.retrieval.config = config

    def close(self) -> None:
        self.batcher.close()
        self.searcher.close()
        self.duplicate_finder.close()
        with self.gallery.lock:
            if self.writable and self.index.backlog():
                self.index.snapshot()
            self.index.close()
        self._exit.close()

    def canary(self) -> None:
        """One real search end to end; raises when the engine cannot serve."""
        spec = self.config.preprocessing
        blank, _ = preprocess(Image.new("RGB", (spec.crop, spec.crop), (128, 128, 128)), spec)
        embedding = self.batcher.submit(blank[None]).result(timeout=120)
        with self.gallery.lock:
            self.gallery.search(embedding.vector.numpy(), 1)

    def decode(self, data: bytes, name: str = "image") -> ModelInput:
        """An upload's pixels and geometry (:meth:`service.decoding.Decoder.upload`)."""
        return self.decoder.upload(data, name)

    def stored_input(self, item: Item) -> ModelInput:
        """A gallery item's picture, decoded again (:meth:`service.decoding.Decoder.stored`)."""
        return self.decoder.stored(item)

    def stored_picture(self, item: Item) -> Image.Image:
        """A gallery item's picture as the model saw it (to draw an explanation)."""
        return self.stored_input(item).picture

    async def decode_all(self, uploads: Uploads, timer: StageTimer) -> list[ModelInput]:
        """Each upload decoded in turn (:meth:`decode`), timed as the ``decode`` stage; counted
        in ``decoding`` meanwhile, so that the backbone's batcher waits for them."""
        self.decoding += 1
        try:
            with timer.stage("decode"):
                return [await in_thread(self.decode, data, name) for name, data in uploads]
        finally:
            self.decoding -= 1

    async def embed(self, queries: list[ModelInput], search_next: bool = False) -> Embedding:
        """Embed through the shared batcher, unless the request's deadline has passed. The
        deadline cancelling this await also cancels the job, which the batcher then skips.

        ``search_next``: the caller calls :meth:`find` with ``embedded=True`` right after, so
        the search batcher waits for it (queries embedded in one batch are searched in one)."""
        check_deadline()
        embedding = await asyncio.wrap_future(
            self.batcher.submit(torch.stack([q.pixels for q in queries]))
        )
        if search_next:
            self.arriving += 1
        return embedding

    async def search(
        self,
        queries: Embedding,
        geometries: list[ImageGeometry],
        options: SearchOptions,
        timer: StageTimer,
        embedded: bool = False,
        stored: Bases | None = None,
    ) -> list[Page]:
        """A page per query: through the shared search batcher (:meth:`find`), or, grouped, one
        query at a time; then the explanations' global term split (``stored``: the bases of
        queries that are gallery items)."""
        if options.group_size is None:
            pages = await self.find(SearchJob(queries, geometries, options, timer), embedded)
        else:
            pages = [
                await in_thread(
                    self.retrieval.grouped, queries[i : i + 1], geometry, options, timer
                )
                for i, geometry in enumerate(geometries)
            ]
        return await self._split(pages, queries, timer, stored)

    async def find(self, job: SearchJob, embedded: bool = False) -> list[Page]:
        """:meth:`search_jobs` through the shared search batcher, so that concurrent requests are
        searched and re-ranked together; the deadline cancelling this await cancels the job.
        ``embedded``: the queries come from ``embed(..., search_next=True)``."""
        try:
            check_deadline()
            future = self.searcher.submit(job)
        finally:
            if embedded:
                self.arriving = max(0, self.arriving - 1)
        return await asyncio.wrap_future(future)

    def search_jobs(self, jobs: list[SearchJob]) -> list[list[Page]]:
        """Several requests' queries at once (:meth:`service.searching.Retrieval.batch`)."""
        return self.retrieval.batch(jobs)

    async def search_examples(
        self,
        positives: tuple[Uploads, list[int]],
        negatives: tuple[Uploads, list[int]],
        options: SearchOptions,
        timer: StageTimer,
    ) -> Page:
        """More like the positives, less like the negatives, each given as uploads and gallery
        ids (:meth:`service.searching.Retrieval.examples`); a hit's global term split
        against the positive it matches best."""
        pos, geometries, bases = await self._examples(*positives, timer, options.explain)
        neg = (await self._examples(*negatives, timer, False))[0] if any(negatives) else None
        exclude = positives[1] + negatives[1]
        page = await in_thread(
            self.retrieval.examples, pos, geometries, neg, exclude, options, timer
        )
        return (await self._split([page], pos, timer, bases))[0]

    async def _split(
        self, pages: list[Page], queries: Embedding, timer: StageTimer, stored: Bases | None
    ) -> list[Page]:
        with timer.stage("explain_global"):
            return await self.split.pages(pages, queries, stored)

    async def _examples(
        self, files: Uploads, ids: list[int], timer: StageTimer, bases: bool
    ) -> tuple[Embedding, list[ImageGeometry], Bases]:
        """Uploads (decoded, embedded together), then stored items, as one Embedding, and with
        ``bases`` every example's global basis (None where a stored item's picture is gone)."""
        parts: list[Embedding] = []
        uploads = await self.decode_all(files, timer) if files else []
        geometries = [u.geometry for u in uploads]
        stored: Bases = []
        if uploads:
            with timer.stage("embed"):
                embedded = await self.embed(uploads)
            parts.append(embedded.without_maps())
            made = bases_of(embedded, self.config.grid) if bases else None
            stored += [None] * len(uploads) if made is None else list(made)
        for item_id in ids:
            if bases:
                embedding, geometry, _, basis = await self.stored_query(item_id)
                stored.append(basis)
            else:
                embedding, geometry, _ = await in_thread(self.stored, item_id)
            parts.append(embedding)
            geometries.append(geometry)
        return Embedding.cat(parts), geometries, stored

    async def stored_query(
        self, item_id: int
    ) -> tuple[Embedding, ImageGeometry, Item, torch.Tensor | None]:
        """:meth:`stored`, and the item's global basis (None where its picture is gone)."""
        embedding, geometry, item = await in_thread(self.stored, item_id)
        return embedding, geometry, item, (await self.split.item_bases([item]))[item.id]

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

    def stored(self, item_id: int) -> tuple[Embedding, ImageGeometry, Item]:
        """A gallery item's stored embedding, geometry and record; NotFoundError when unknown."""
        embedding, item = self.gallery.stored(item_id)
        return embedding, self.geometry(item), item

    def geometry(self, item: Item) -> ImageGeometry:
        return geometry_of(item.width, item.height, self.config.preprocessing)

    def item(self, item_id: int) -> Item:
        return self.gallery.item(item_id)

    def items(self, ids: list[int]) -> dict[int, Item]:
        return self.gallery.items(ids)

    def labels(self) -> list[tuple[str, int]]:
        return self.gallery.labels()

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        return self.gallery.page(offset, limit)

    @property
    def count(self) -> int:
        return self.index.count

    @property
    def grids_on_device(self) -> bool:
        return self.device_search is not None and self.device_search.part_grids is not None

    async def duplicates(self, threshold: float, structural_threshold: float) -> DuplicateGroups:
        """The gallery's groups of near-copies (:meth:`DuplicateFinder.groups`)."""
        return await self.duplicate_finder.groups(threshold, structural_threshold)

    async def add(self, uploads: Uploads, key: str | None, label: str | None) -> Added:
        """Add uploads, all or nothing (:meth:`service.writes.Writes.add`)."""
        return await self.writes.add(uploads, key, label)

    def remove(self, item_id: int) -> int:
        """Remove an item; the number left (:meth:`service.writes.Writes.remove`)."""
        return self.writes.remove(item_id)
