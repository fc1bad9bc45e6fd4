"""Opening an index wherever it lives (:mod:`index_builder.location`): a folder or a Qdrant
collection, behind one set of reads and writes, so that the CLI and the service do not ask
which they have."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from index_builder.gallery import GalleryIndex, writing
from index_builder.location import Location, QdrantLocation, parse_location
from index_builder.qdrant_collection import qdrant_exists
from index_builder.qdrant_index import QdrantIndex
from index_builder.versions import has_index

AnyIndex = GalleryIndex | QdrantIndex


def index_exists(where: str | Path | Location) -> bool:
    location = parse_location(where)
    if isinstance(location, QdrantLocation):
        return qdrant_exists(location)
    return has_index(location)


def open_index(
    where: str | Path | Location, expected_fingerprint: str | None = None, writable: bool = False
) -> AnyIndex:
    """Open for reading (or writing, without a folder's writer lock: see :func:`opened`)."""
    location = parse_location(where)
    if isinstance(location, QdrantLocation):
        return QdrantIndex.open(location, expected_fingerprint, writable)
    return GalleryIndex.open(location, expected_fingerprint, writable)


@contextlib.contextmanager
def opened(
    where: str | Path | Location, expected_fingerprint: str | None = None, writable: bool = False
) -> Iterator[AnyIndex]:
    """An index, closed on the way out; a folder opened for writing holds the writer lock."""
    location = parse_location(where)
    if writable and not isinstance(location, QdrantLocation):
        with writing(location, expected_fingerprint) as folder:
            yield folder
        return
    index: AnyIndex = open_index(location, expected_fingerprint, writable)
    try:
        yield index
    finally:
        index.close()
