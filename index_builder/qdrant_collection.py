"""A Qdrant collection of this project's layout: connecting, making one, and the point ids and
payloads that hold gallery items.

Per point (one gallery item): named vector ``global`` (dot product on unit vectors,
HNSW-indexed); named multivector ``parts``, the R x D part grid in float16, on disk, without
an HNSW index; payload ``item`` (the item id), ``key``, ``path``, ``label``, ``sha256``,
``width``, ``height``, ``added``. The point id and the item id are the first 60 bits of the
sha256 of the image's bytes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from index_builder.location import QdrantLocation
from index_builder.manifest import IndexFormatError, Manifest
from index_builder.table import Item

if TYPE_CHECKING:
    from qdrant_client import QdrantClient


def connect(location: QdrantLocation) -> QdrantClient:
    try:
        from qdrant_client import QdrantClient
    except ImportError as e:  # the default install stays small
        raise IndexFormatError(
            f"{location}: Qdrant locations need qdrant-client: "
            "pip install 'diml-retrieval[cluster]'"
        ) from e
    return QdrantClient(**location.client_arguments())  # type: ignore[arg-type]


def item_id(sha256: str) -> int:
    """An item's id from its bytes' sha256: its first 60 bits (below 2^63, as ids must be)."""
    return int(sha256[:15], 16)


def qdrant_exists(location: QdrantLocation) -> bool:
    client = connect(location)
    try:
        return bool(client.collection_exists(location.collection))
    finally:
        client.close()


def make_collection(client: QdrantClient, location: QdrantLocation, manifest: Manifest) -> None:
    """Create the collection at ``location`` for ``manifest``'s model: the layout above, the
    manifest's fields (but the count) as its metadata."""
    from qdrant_client import models

    meta = {k: v for k, v in vars(manifest).items() if k != "count"}
    shards, replicas = _distribution(location)
    client.create_collection(
        location.collection,
        vectors_config={
            "global": models.VectorParams(size=manifest.dim, distance=models.Distance.DOT),
            "parts": models.VectorParams(
                size=manifest.dim,
                distance=models.Distance.DOT,
                datatype=models.Datatype.FLOAT16,
                multivector_config=models.MultiVectorConfig(
                    comparator=models.MultiVectorComparator.MAX_SIM
                ),
                hnsw_config=models.HnswConfigDiff(m=0),
                on_disk=True,
            ),
        },
        metadata=meta,
        shard_number=shards,
        replication_factor=replicas,
    )
    if location.path is None:  # local mode filters without payload indexes (and warns)
        for name in ("label", "sha256", "item"):
            schema = models.PayloadSchemaType.INTEGER if name == "item" else (
                models.PayloadSchemaType.KEYWORD)  # fmt: skip
            client.create_payload_index(location.collection, name, schema)


def _distribution(location: QdrantLocation) -> tuple[int | None, int | None]:
    """Shards and replicas of a new collection on a server or cluster (``DIML_QDRANT_SHARDS``
    and ``DIML_QDRANT_REPLICAS``; the server's defaults when unset); local mode has neither."""
    if location.path is None:
        shards, replicas = (
            os.environ.get(n) for n in ("DIML_QDRANT_SHARDS", "DIML_QDRANT_REPLICAS")
        )
        return (int(shards) if shards else None), (int(replicas) if replicas else None)
    return None, None


def item_of(payload: dict[str, Any] | None) -> Item:
    p = payload or {}
    return Item(int(p["item"]), p["key"], p.get("path"), p.get("label"), p["sha256"],
                int(p["width"]), int(p["height"]), p["added"])  # fmt: skip
