"""A gallery in a Qdrant collection: the same reads and writes as a folder index.

Collection layout, per point (one gallery item):

- named vector ``global`` (dot product on unit vectors, HNSW-indexed);
- named multivector ``parts``: the R x D part grid in float16, kept on disk, no HNSW index (it is
  read back for the structural re-ranking, never searched by itself);
- payload ``item`` (the item id), ``key``, ``path``, ``label``, ``sha256``, ``width``,
  ``height``, ``added``;
- the point id and the item id are the first 60 bits of the sha256 of the image's bytes, so a
  build rerun after a crash upserts the same points again, and two copies of one file are one
  item.

The model's fingerprint, backbone, grid and dims are the collection's metadata, checked on open
(another model is refused, naming both, as the folder index does). Label filters run in Qdrant
(a keyword payload index on ``label``). qdrant-client is imported only here and in
:mod:`index_builder.qdrant_collection` (which makes collections of this layout): the ``cluster``
extra installs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from index_builder.interface import FingerprintMismatchError, LabelFilter, require_fingerprint
from index_builder.location import QdrantLocation
from index_builder.manifest import IndexFormatError, Manifest, now
from index_builder.qdrant_collection import connect, item_id, item_of, make_collection
from index_builder.table import Item, NewItem
from model.quantization import round_trip

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

PAGE = 1024
# HNSW on the global vector: Qdrant's defaults for the graph (m 16, ef_construct 100) and this
# ef at search time (at least the k asked for); tests/index_builder/test_qdrant_edge.py measures
# the recall it gives in Qdrant's own engine.
SEARCH_EF = 128
LABELS = 100_000  # the most labels listed


class QdrantIndex:
    """An opened collection. ``manifest`` describes it as a folder's manifest would."""

    def __init__(self, location: QdrantLocation, client: QdrantClient, manifest: Manifest,
                 writable: bool) -> None:  # fmt: skip
        self.location, self.client, self.manifest = location, client, manifest
        self.writable = writable
        self.collection = location.collection
        self._last: dict[int, Any] = {}  # the points the last search returned, by id

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def create(cls, location: QdrantLocation, manifest: Manifest) -> QdrantIndex:
        """Create the collection for ``manifest``'s model, or open it when it exists for the same
        model (a build resumes by upserting); another model's collection is refused."""

        client = connect(location)
        if client.collection_exists(location.collection):
            client.close()
            return cls.open(location, manifest.fingerprint, writable=True)
        make_collection(client, location, manifest)
        return cls(location, client, manifest, writable=True)

    @classmethod
    def open(
        cls, location: QdrantLocation, expected_fingerprint: str | None = None,
        writable: bool = False,
    ) -> QdrantIndex:  # fmt: skip
        client = connect(location)
        if not client.collection_exists(location.collection):
            client.close()
            raise IndexFormatError(
                f"{location}: no such collection; build one with `diml index build --out "
                f"{location}`"
            )
        meta = client.get_collection(location.collection).config.metadata or {}
        try:
            manifest = Manifest(**{**meta, "count": 0})
        except TypeError as e:
            client.close()
            raise IndexFormatError(f"{location}: not a collection of this project ({e})") from e
        try:
            require_fingerprint(location, manifest.fingerprint, expected_fingerprint)
        except FingerprintMismatchError:
            client.close()
            raise
        return cls(location, client, manifest, writable)

    def check_model(self, fp: str) -> None:
        """Refuse embeddings of another model than the one that built this collection."""
        require_fingerprint(self.location, self.manifest.fingerprint, fp)

    def close(self) -> None:
        self.client.close()

    # -- reads -------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    @property
    def ids(self) -> np.ndarray:
        """Every item id, ascending."""
        return self._scroll_ids()

    def _scroll_ids(self, where: LabelFilter | None = None, limit: int | None = None) -> np.ndarray:
        """The ids of the items ``where`` allows (the first ``limit`` of them), ascending: Qdrant
        scrolls in id order."""
        found: list[int] = []
        offset, selected = None, self._filter(where)
        while limit is None or len(found) < limit:
            step = PAGE if limit is None else min(PAGE, limit - len(found))
            points, offset = self.client.scroll(
                self.collection, scroll_filter=selected, limit=step, offset=offset,
                with_payload=False, with_vectors=False,
            )  # fmt: skip
            found += [int(p.id) for p in points]
            if offset is None:
                break
        return np.sort(np.asarray(found, dtype=np.int64))

    def search(
        self, queries: np.ndarray, k: int, where: LabelFilter | None = None, **_: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries: (n, D) -> scores (n, k), ids (n, k), -1 past the end; the filter runs in
        Qdrant, inside the search."""
        from qdrant_client import models

        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"queries must be (n, {self.manifest.dim}), got {queries.shape}")
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        selected = self._filter(where)
        # local mode searches exactly (and warns that it ignores search parameters)
        ef = None if self.location.path else models.SearchParams(hnsw_ef=max(SEARCH_EF, k))
        requests = [
            models.QueryRequest(
                query=q.tolist(),
                using="global",
                limit=k,
                filter=selected,
                params=ef,
                with_payload=True,
                with_vector=["global", "parts"],
            )
            for q in np.asarray(queries, dtype=np.float32)
        ]
        fetched: dict[int, Any] = {}
        for row, answer in enumerate(self.client.query_batch_points(self.collection, requests)):
            for col, point in enumerate(answer.points):
                scores[row, col], ids[row, col] = point.score, int(point.id)
                fetched[int(point.id)] = point
        # The candidates' grids come back with the hits (one round trip); the re-ranking that
        # follows reads them from here. Only the last search's are kept, so none go stale.
        self._last = fetched
        return scores, ids

    def _filter(self, where: LabelFilter | None) -> Any:
        from qdrant_client import models

        if not where:
            return None
        must = []
        if where.labels is not None:
            must.append(
                models.FieldCondition(key="label", match=models.MatchAny(any=list(where.labels)))
            )
        must_not = []
        if where.exclude:
            must_not.append(
                models.FieldCondition(key="label", match=models.MatchAny(any=list(where.exclude)))
            )
        return models.Filter(must=must or None, must_not=must_not or None)

    def selection(self, where: LabelFilter | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """A label filter as item ids (allowed or None, denied or None)."""
        if not where:
            return None, None
        allow = None if where.labels is None else self._scroll_ids(LabelFilter(where.labels))
        deny = self._scroll_ids(LabelFilter(where.exclude)) if where.exclude else None
        return allow, deny

    def _points(self, ids: np.ndarray | list[int], vectors: list[str] | bool) -> dict[int, Any]:
        """The points ``ids`` that exist, by id: from the last search where it returned them,
        else read (with the named ``vectors``, or none)."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64)).tolist()
        found = {i: p for i in wanted if (p := self._last.get(i)) is not None}
        missing = [i for i in wanted if i not in found]
        for start in range(0, len(missing), PAGE):
            for point in self.client.retrieve(self.collection, missing[start : start + PAGE],
                                              with_payload=True, with_vectors=vectors):  # fmt: skip
                found[int(point.id)] = point
        return found

    def _vectors(self, ids: np.ndarray, name: str, dtype: type) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        points = self._points(ids, [name])
        rows: list[np.ndarray] = []
        for i in ids.tolist():
            if i not in points:
                raise KeyError(f"no live item with id {i}")
            rows.append(np.asarray(points[i].vector[name], dtype=dtype))
        return np.stack(rows) if rows else np.zeros((0,), dtype=dtype)

    def grids(self, ids: np.ndarray) -> np.ndarray:
        """ids: (n,) -> part grids (n, R, D) float16."""
        return self._vectors(ids, "parts", np.float16)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """ids: (n,) -> global vectors (n, D) float32."""
        return self._vectors(ids, "global", np.float32)

    def items(self, ids: list[int] | np.ndarray) -> dict[int, Item]:
        return {i: item_of(p.payload) for i, p in self._points(ids, False).items()}

    def page(self, offset: int, limit: int) -> list[Item]:
        """Up to ``limit`` items in id order from position ``offset`` (scrolls the ids before
        it: Qdrant pages by id, not by position)."""
        ids = self._scroll_ids(limit=offset + limit)[offset:]
        found = self.items(ids)
        return [found[int(i)] for i in ids if int(i) in found]

    def keys_by_sha256(self, digests: Any = None) -> dict[str, str]:
        """sha256 -> key of the item with those bytes, for ``digests`` (None: all)."""
        if digests is None:
            return {item.sha256: item.key for item in self.page(0, self.count)}
        wanted = {item_id(d): d for d in digests}
        return {wanted[i]: item.key for i, item in self.items(list(wanted)).items()}

    def labels(self) -> list[tuple[str, int]]:
        """Every label and its number of items (Qdrant's exact facet counts)."""
        facet = self.client.facet(self.collection, key="label", limit=LABELS, exact=True)
        counts = [(str(hit.value), int(hit.count)) for hit in facet.hits]
        return sorted(counts, key=lambda kv: (-kv[1], kv[0]))

    def info(self) -> dict[str, Any]:
        return {**vars(self.manifest), "count": self.count, "path": str(self.location),
                "factory": "qdrant HNSW", "size_bytes": None, "bytes_per_item": None,
                "segments": None, "grid_storage": "float16 (int8's values)",
                "skipped": None}  # fmt: skip

    # -- writes --------------------------------------------------------------------------------

    def add(self, items: list[NewItem], vectors: np.ndarray, grids: np.ndarray) -> list[int]:
        """Upsert the items (ids from their bytes) with vectors (n, D) and grids (n, R, D); once
        this returns, the points are written (``wait=True``). The grids are the values a folder
        index keeps (int8 and a scale per part, :func:`~model.quantization.round_trip`), so
        both backends rank and explain with the same numbers."""
        from qdrant_client import models

        self._require_writable()
        self.manifest.check_rows(len(items), vectors, grids)
        grids = round_trip(grids)
        added = now()
        ids = [item_id(it.sha256) for it in items]
        points = [
            models.PointStruct(
                id=i,
                vector={"global": v.astype(np.float32).tolist(),
                        "parts": g.astype(np.float32).tolist()},
                payload={"item": i, "key": it.key, "path": it.path, "label": it.label,
                         "sha256": it.sha256, "width": it.width, "height": it.height,
                         "added": added},
            )
            for i, it, v, g in zip(ids, items, vectors, grids, strict=True)
        ]  # fmt: skip
        for start in range(0, len(points), 256):
            self.client.upsert(self.collection, points[start : start + 256], wait=True)
        return ids

    def remove(self, ids: list[int]) -> list[int]:
        from qdrant_client import models

        self._require_writable()
        live = sorted(self.items(ids))
        self._last = {}
        if live:
            self.client.delete(self.collection, models.PointIdsList(points=live), wait=True)
        return live

    def backlog(self) -> int:
        return 0  # Qdrant persists and indexes by itself

    def snapshot(self) -> None:
        pass

    def recover(self) -> None:
        pass

    def verify(self, fingerprint: str | None = None, sample: int = 20) -> list[str]:
        """Problems found: the fingerprint, and a sample of items finding themselves first."""
        problems = []
        if fingerprint is not None and fingerprint != self.manifest.fingerprint:
            problems.append(
                f"built by model {self.manifest.fingerprint[:16]}, not {fingerprint[:16]}"
            )
        ids = self.ids
        if len(ids):
            chosen = ids[np.linspace(0, len(ids) - 1, min(sample, len(ids))).astype(int)]
            _, found = self.search(self.vectors(chosen), 1)
            for wanted, got in zip(chosen, found[:, 0], strict=True):
                if wanted != got:
                    problems.append(f"item {wanted} does not find itself first (found {got})")
        return problems

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.location}: opened read-only")
