"""Building into a Qdrant collection: embedded batches upserted as they come, from this
process (:func:`build_qdrant`) or from Ray (:mod:`index_builder.ray_build`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from index_builder.adding import add_embedded
from index_builder.embedding import embed_sources
from index_builder.location import QdrantLocation
from index_builder.manifest import Manifest
from index_builder.qdrant_index import QdrantIndex
from index_builder.records import EmbeddedBatch, Report, Source
from model import Embedder, fingerprint
from model.network import EmbeddingNet


def build_qdrant(
    sources: Sequence[Source],
    location: QdrantLocation,
    embedder: Embedder,
    batch_size: int,
    workers: int,
    max_bytes: int,
    progress: bool,
) -> Report:
    """Index ``sources`` into the collection at ``location``, embedded in this process."""
    batches = embed_sources(sources, embedder, batch_size, workers, max_bytes, progress)
    return write_qdrant(location, embedder.model, batches)


def write_qdrant(
    location: QdrantLocation, model: EmbeddingNet, batches: Iterable[EmbeddedBatch]
) -> Report:
    """Upsert embedded batches (from :func:`index_builder.embedding.embed_sources`, or from
    Ray) into a collection made for ``model``. Point ids come from the bytes, so a rerun
    after a crash writes the same points again: an image already there under its own key is
    neither added nor reported, one whose bytes another item holds is skipped as a duplicate."""
    started = time.perf_counter()
    index = create_collection(location, model)
    report = Report()
    try:
        for batch in batches:
            report.skipped += batch.skipped()
            part = add_embedded(index, batch.embedded(), resume=True)
            report.indexed += part.indexed
            report.skipped += part.skipped
        report.count = index.count
    finally:
        index.close()
    report.seconds = time.perf_counter() - started
    return report


def create_collection(location: QdrantLocation, model: EmbeddingNet) -> QdrantIndex:
    """The collection at ``location`` for ``model``'s embeddings, opened for writing: made
    when missing, reopened (a build resumed) when made for the same model."""
    manifest = Manifest.of_model(model, fingerprint(model), "qdrant", count=0)
    return QdrantIndex.create(location, manifest)
