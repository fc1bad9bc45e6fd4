"""Gallery -> index artefact (FAISS, part-grid store, item table, manifest). Depends on model/."""

from index_builder.adding import add_embedded, add_images
from index_builder.build import build_index
from index_builder.files import IndexBusyError
from index_builder.gallery import GalleryIndex, writing
from index_builder.interface import FingerprintMismatchError, LabelFilter
from index_builder.location import QdrantLocation, parse_location
from index_builder.manifest import IndexFormatError, Manifest
from index_builder.opening import index_exists, open_index, opened
from index_builder.records import Decoded, Embedded, EmbeddedBatch, Report, Source
from index_builder.sources import SourceListError, read_list, scan_folder
from index_builder.table import Item, NewItem
from index_builder.vector_index import VectorIndex, default_factory
from index_builder.versions import has_index

__all__ = [
    "Decoded",
    "Embedded",
    "EmbeddedBatch",
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
    "SourceListError",
    "VectorIndex",
    "add_embedded",
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
