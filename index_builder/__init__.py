"""Gallery -> index artefact (FAISS, part-grid store, item table, manifest). Depends on model/."""

from index_builder.build import Report, Source, add_images, build_index, read_list, scan_folder
from index_builder.files import IndexBusyError
from index_builder.gallery import (
    FingerprintMismatchError,
    GalleryIndex,
    LabelFilter,
    has_index,
    writing,
)
from index_builder.location import QdrantLocation, parse_location
from index_builder.manifest import IndexFormatError, Manifest
from index_builder.opening import index_exists, open_index, opened
from index_builder.table import Item, NewItem
from index_builder.vector_index import VectorIndex, default_factory

__all__ = [
    "FingerprintMismatchError",
    "GalleryIndex",
    "IndexBusyError",
    "IndexFormatError",
    "Item",
    "LabelFilter",
    "Manifest",
    "NewItem",
    "QdrantLocation",
    "Report",
    "Source",
    "VectorIndex",
    "add_images",
    "build_index",
    "default_factory",
    "has_index",
    "index_exists",
    "open_index",
    "opened",
    "parse_location",
    "read_list",
    "scan_folder",
    "writing",
]
