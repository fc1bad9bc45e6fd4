"""Adding embedded images to an opened index (a folder or a Qdrant collection), all or nothing,
with the bytes already there skipped and reported."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from index_builder.embedding import embed_sources
from index_builder.limits import DEFAULT_MAX_BYTES
from index_builder.opening import AnyIndex
from index_builder.records import Embedded, Report, Source
from model import Embedder, fingerprint


def add_images(
    index: AnyIndex,
    sources: Sequence[Source],
    embedder: Embedder,
    batch_size: int = 32,
    workers: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Report:
    """Decode, embed and add ``sources`` to ``index`` (opened for writing) in one all-or-nothing
    step; unreadable files, non-images and bytes already in the index are skipped and reported."""
    started = time.perf_counter()
    index.check_model(fingerprint(embedder.model))
    skipped: list[dict[str, str]] = []
    embedded: list[Embedded] = []
    for batch in embed_sources(sources, embedder, batch_size, workers, max_bytes):
        embedded += batch.embedded()
        skipped += batch.skipped()
    report = add_embedded(index, embedded)
    report.skipped = skipped + report.skipped
    report.seconds = time.perf_counter() - started
    return report


def add_embedded(index: AnyIndex, embedded: Sequence[Embedded], resume: bool = False) -> Report:
    """Add embedded images to ``index`` in one all-or-nothing step (the only part of an add that
    needs the index to itself). Bytes already in the index, or earlier in ``embedded``, are
    skipped and reported; ``Report.ids`` are the new items' ids in order. ``resume``: an image
    already in the index under its own key (a rerun of a build) is passed over unreported."""
    report = Report()
    known = index.keys_by_sha256(e.sha256 for e in embedded)
    fresh: list[Embedded] = []
    for e in embedded:
        if resume and known.get(e.sha256) == e.source.key:
            continue
        if e.sha256 in known:
            reason = f"duplicate bytes of {known[e.sha256]}"
            report.skipped.append({"path": str(e.source.path), "reason": reason})
            continue
        known[e.sha256] = e.source.key
        fresh.append(e)
    if fresh:
        vectors = np.stack([e.vector for e in fresh]).astype(np.float32, copy=False)
        grids = np.stack([e.grid for e in fresh])
        report.ids = index.add([e.item() for e in fresh], vectors, grids)
    report.indexed = len(fresh)
    report.count = index.count
    return report
