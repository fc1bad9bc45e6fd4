"""Gallery in, index out: decode in parallel workers, embed in batches, write segments.

A build works in ``INDEX_DIR/.building``: every ``segment_size`` items it writes a segment and
commits its rows (and the files it skipped, with the reason), so an interrupted build resumes
where it stopped when run again with the same inputs and model. At the end it trains and fills
the FAISS index, writes the manifest and swaps the new version in atomically; until then the
previous version stays live. A Qdrant collection is filled batch by batch instead
(:mod:`index_builder.qdrant_build`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index_builder.embedding import default_workers, embed_sources
from index_builder.files import crashpoint, writer_lock
from index_builder.gallery import (
    BUILDING,
    SNAPSHOT_META,
    SNAPSHOT_SEGMENT_META,
    GalleryIndex,
)
from index_builder.limits import DEFAULT_MAX_BYTES
from index_builder.location import Location, QdrantLocation, parse_location
from index_builder.manifest import Manifest
from index_builder.qdrant_build import build_qdrant
from index_builder.records import Embedded, EmbeddedBatch, Report, Source
from index_builder.segments import SegmentStore
from index_builder.table import ItemTable
from index_builder.vector_index import VectorIndex, default_factory
from index_builder.versions import publish as publish_version
from model import Embedder, fingerprint
from model.network import EmbeddingNet

log = logging.getLogger(__name__)

BUILD_INFO = "build.json"


def build_index(
    sources: Sequence[Source],
    out: str | Path | Location,
    embedder: Embedder,
    factory: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    segment_size: int = 2048,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> Report:
    """Index ``sources`` into ``out``: a folder (a new version, swapped in at the end) or a
    Qdrant collection (points upserted batch by batch). Resumable either way."""
    started = time.perf_counter()
    model = embedder.model
    fp = fingerprint(model)
    workers = default_workers(embedder.device) if workers is None else workers
    location = parse_location(out)
    if isinstance(location, QdrantLocation):
        return build_qdrant(sources, location, embedder, batch_size, workers, max_bytes, progress)
    out = location
    with writer_lock(out):
        work = out / BUILDING
        table = _resume_or_start(work, fp, factory, sources)
        store = SegmentStore(work)
        store.remove_orphans({s.id for s in table.segments()})
        seen = table.seen_paths()
        todo = [s for s in sources if str(s.path) not in seen]
        segments = _SegmentWriter(table, store, table.keys_by_sha256(), segment_size)
        for batch in embed_sources(todo, embedder, batch_size, workers, max_bytes, progress):
            segments.take(batch)
        segments.flush()
        _finish(work, table, store, model, fp, factory)
        table.close()
        publish_version(out, work)
    report = Report(indexed=segments.indexed)
    index = GalleryIndex.open(out)
    report.count = index.count
    report.skipped = [{"path": p, "reason": r} for p, r in index.table.skipped()]
    index.close()
    report.seconds = time.perf_counter() - started
    return report


class _SegmentWriter:
    """A build's embedded images and skipped files, committed a segment of ``size`` items at a
    time. ``known``: sha256 -> key of the bytes already indexed (later copies are skipped)."""

    def __init__(
        self, table: ItemTable, store: SegmentStore, known: dict[str, str], size: int
    ) -> None:
        self.table, self.store, self.known, self.size = table, store, known, size
        self.pending: list[Embedded] = []
        self.skipped: list[tuple[str, str]] = []
        self.indexed = 0

    def take(self, batch: EmbeddedBatch) -> None:
        """One batch of the embedding loop, in order; a segment is written when one is full."""
        self.skipped += [(str(d.source.path), d.reason) for d in batch.failed]
        for e in batch.embedded():
            if e.sha256 in self.known:
                self.skipped.append(
                    (str(e.source.path), f"duplicate bytes of {self.known[e.sha256]}")
                )
                continue
            self.pending.append(e)
            self.known[e.sha256] = e.source.key
            if len(self.pending) >= self.size:
                self.flush()

    def flush(self) -> None:
        """Commit the pending items as a segment, with the skipped files, at once."""
        pending, skipped, table = self.pending, self.skipped, self.table
        if not pending and not skipped:
            return
        if pending:
            vectors = np.stack([e.vector for e in pending])
            grids = np.stack([e.grid for e in pending])
            info = self.store.write(table.next_segment(), vectors, grids)
            crashpoint("build:segment-written")
            items = [e.item() for e in pending]
            table.commit_segment(info, table.next_id(), items, skipped)
            crashpoint("build:segment-committed")
        else:
            table.record_skipped(skipped)
        self.indexed += len(pending)
        self.pending, self.skipped = [], []


def _resume_or_start(
    work: Path, fp: str, factory: str | None, sources: Sequence[Source]
) -> ItemTable:
    """Reopen an interrupted build with the same model, factory and sources; else start anew."""
    digest = hashlib.sha256("\n".join(sorted(str(s.path) for s in sources)).encode()).hexdigest()
    info = {"fingerprint": fp, "factory": factory, "sources": digest}
    previous = work / BUILD_INFO
    if work.exists():
        try:
            same = json.loads(previous.read_text()) == info
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            log.info("resuming the interrupted build in %s", work)
        else:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not previous.exists():
        previous.write_text(json.dumps(info))
    return ItemTable(work)


def _finish(
    work: Path,
    table: ItemTable,
    store: SegmentStore,
    model: EmbeddingNet,
    fp: str,
    factory: str | None,
) -> None:
    """Train and fill the FAISS index from the segments, write snapshot and manifest."""
    ids, segments, rows = table.locations()
    vectors = store.gather(segments, rows, grids=False)
    chosen = factory or default_factory(len(ids), model.dim)
    index = VectorIndex.create(chosen, model.dim)
    if index.needs_training:
        if len(ids) == 0:
            raise ValueError(f"{chosen} needs training vectors but no image could be indexed")
        rng = np.random.default_rng(0)
        sample = rng.choice(len(ids), size=index.training_size(len(ids)), replace=False)
        try:
            index.train(vectors[np.sort(sample)])
        except RuntimeError as e:
            raise ValueError(
                f"cannot train {chosen} on {len(ids)} vectors ({e}); use --factory Flat for a "
                "gallery this small, or fewer IVF lists"
            ) from e
    index.add(ids, vectors)
    last = table.next_segment() - 1
    name = f"index-{last:06d}.faiss"
    index.write(work / name)
    table.set_meta(SNAPSHOT_META, name)
    table.set_meta(SNAPSHOT_SEGMENT_META, str(last))
    Manifest.of_model(model, fp, chosen, len(ids)).write(work)
    (work / BUILD_INFO).unlink(missing_ok=True)
