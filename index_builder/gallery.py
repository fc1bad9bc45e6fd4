"""An index folder, opened: search, part grids of candidates, item records, adds and removals.

Layout of ``INDEX_DIR``::

    CURRENT                 the name of the live version folder (replaced atomically)
    v-<time>-<tag>/         one complete artefact:
        manifest.json       schema, model fingerprint, backbone, grid, dim, factory, count
        items.sqlite        the item table (source of truth), segment records, skipped files
        segments/           global vectors (float32), part grids (int8 + a scale a part), mmapped
        index-<S>.faiss     FAISS snapshot holding every item of segments <= S
    .building/              a build in progress (resumed by the next build with same inputs)

Opening loads the FAISS snapshot and adds the items of later segments (adds since the snapshot),
then applies removals, so every acknowledged add and removal is visible.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.files import crashpoint, writer_lock
from index_builder.interface import FingerprintMismatchError, LabelFilter, require_fingerprint
from index_builder.manifest import IndexFormatError, Manifest
from index_builder.segments import SegmentStore
from index_builder.table import Item, ItemTable, NewItem
from index_builder.vector_index import VectorIndex
from index_builder.versions import live_version
from model.files import sha256_file

log = logging.getLogger(__name__)

BUILDING = ".building"
SNAPSHOT_META = "snapshot"
SNAPSHOT_SEGMENT_META = "snapshot_segment"
SNAPSHOT_BACKLOG = 1000


class GalleryIndex:
    """An opened index version. Reads need no lock; writers hold the folder's writer lock."""

    def __init__(self, folder: Path, writable: bool = False) -> None:
        self.folder = folder
        self.writable = writable
        self.manifest = Manifest.read(folder)
        self.table = ItemTable(folder, readonly=not writable)
        self.store = SegmentStore(folder)
        self.ids, self._segments, self._rows = self.table.locations()
        self.vectors_index = self._load_vectors()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, root: str | Path, expected_fingerprint: str | None = None, writable: bool = False
    ) -> GalleryIndex:
        """Open the live version of the index at ``root``.

        ``expected_fingerprint``: the loaded model's; a different one in the manifest is refused
        with both named.
        """
        folder = live_version(Path(root))
        index = cls(folder, writable=writable)
        try:
            require_fingerprint(root, index.manifest.fingerprint, expected_fingerprint)
        except FingerprintMismatchError:
            index.close()
            raise
        return index

    def check_model(self, fp: str) -> None:
        """Refuse embeddings of another model than the one that built this index."""
        require_fingerprint(self.folder, self.manifest.fingerprint, fp)

    def close(self) -> None:
        self.table.close()

    def _load_vectors(self) -> VectorIndex:
        snapshot = self.table.meta(SNAPSHOT_META)
        covered = int(self.table.meta(SNAPSHOT_SEGMENT_META, "-1") or -1)
        if snapshot is None:
            raise IndexFormatError(f"{self.folder}: no FAISS snapshot recorded; rebuild the index")
        index = VectorIndex.read(self.folder / snapshot, self.manifest.factory)
        newer = self._segments > covered
        if newer.any():
            vectors = self.store.gather(self._segments[newer], self._rows[newer], grids=False)
            index.add(self.ids[newer], vectors)
        index.remove(self.table.removed_ids())
        return index

    # -- reads -------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self.ids)

    def search(
        self, queries: np.ndarray, k: int, where: LabelFilter | None = None, **params: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries: (n, D) float32, unit length -> scores (n, k), ids (n, k), -1 past the end.
        ``where``: only items it allows, selected inside the search (k come back when k exist)."""
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"queries must be (n, {self.manifest.dim}), got {queries.shape}")
        allow, deny = self.selection(where)
        return self.vectors_index.search(queries, k, allow=allow, deny=deny, **params)

    def selection(self, where: LabelFilter | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """A label filter as item ids: (allowed or None for all, denied or None for none)."""
        if not where:
            return None, None
        allow = None if where.labels is None else self.table.ids_with_labels(where.labels)
        deny = self.table.ids_with_labels(where.exclude) if where.exclude else None
        return allow, deny

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids: (n,) live item ids -> their (segments, rows); KeyError names an unknown id."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos_ok = np.minimum(pos, max(len(self.ids) - 1, 0))
        found = (pos < len(self.ids)) & (self.ids[pos_ok] == ids) if len(self.ids) else ids < -1
        if not found.all():
            raise KeyError(f"no live item with id {int(ids[~found][0])}")
        return self._segments[pos], self._rows[pos]

    def grids(self, ids: np.ndarray) -> np.ndarray:
        """ids: (n,) -> part grids (n, R, D) float16, read from the memory-mapped segments."""
        return self.store.gather(*self.locate(ids), grids=True)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """ids: (n,) -> global vectors (n, D) float32."""
        return self.store.gather(*self.locate(ids), grids=False)

    def items(self, ids: list[int] | np.ndarray) -> dict[int, Item]:
        return self.table.items([int(i) for i in ids])

    def page(self, offset: int, limit: int) -> list[Item]:
        """Up to ``limit`` live items in id order from position ``offset``."""
        return self.table.page(offset, limit)

    def keys_by_sha256(self, digests: Iterable[str] | None = None) -> dict[str, str]:
        """sha256 -> key of the live item with those bytes, for ``digests`` (None: all)."""
        return self.table.keys_by_sha256(digests)

    def labels(self) -> list[tuple[str, int]]:
        """Every label of a live item and its number of items, most common first."""
        return self.table.labels()

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def info(self) -> dict[str, Any]:
        size = self.size_on_disk()
        segments = self.table.segments()
        kinds = Counter(self.store.grid_storage(s.id) for s in segments)
        return {
            **vars(self.manifest),
            "count": self.count,
            "path": str(self.folder),
            "size_bytes": size,
            "bytes_per_item": round(size / self.count) if self.count else None,
            "segments": len(segments),
            # int8 unless segments were written before (float16: a rebuild halves them)
            "grid_storage": ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items())),
            "skipped": len(self.table.skipped()),
        }

    # -- writes (the caller holds the writer lock) -----------------------------------------

    def add(self, items: list[NewItem], vectors: np.ndarray, grids: np.ndarray) -> list[int]:
        """Add items with their vectors (n, D) float32 and grids (n, R, D): all or nothing.

        Returns the new ids. The segment files are durable before the table commits them; a
        crash before the commit leaves orphan files that the next writer deletes.
        """
        self._require_writable()
        self.manifest.check_rows(len(items), vectors, grids)
        if not items:
            return []
        segment = self.table.next_segment()
        first = self.table.next_id()
        info = self.store.write(segment, vectors, grids)
        crashpoint("add:segment-written")
        self.table.commit_segment(info, first, items)
        crashpoint("add:committed")
        ids = np.arange(first, first + len(items), dtype=np.int64)
        self.vectors_index.add(ids, vectors)
        self.ids = np.concatenate([self.ids, ids])
        self._segments = np.concatenate([self._segments, np.full(len(ids), segment)])
        self._rows = np.concatenate([self._rows, np.arange(len(ids))])
        self._write_manifest()
        return ids.tolist()

    def remove(self, ids: list[int]) -> list[int]:
        """Remove live items; returns the ids that were live. Visible to the next search."""
        self._require_writable()
        removed = self.table.remove(ids)
        if removed:
            gone = np.asarray(removed, dtype=np.int64)
            self.vectors_index.remove(gone)
            keep = ~np.isin(self.ids, gone)
            self.ids, self._segments, self._rows = (
                self.ids[keep],
                self._segments[keep],
                self._rows[keep],
            )
            self._write_manifest()
        return removed

    def backlog(self) -> int:
        """Live items added since the FAISS snapshot (replayed from segments at every open)."""
        covered = int(self.table.meta(SNAPSHOT_SEGMENT_META, "-1") or -1)
        return int((self._segments > covered).sum())

    def snapshot(self) -> None:
        """Write the FAISS index as it is now, so that opening need not replay later segments."""
        self._require_writable()
        last = self.table.next_segment() - 1
        name = f"index-{last:06d}.faiss"
        old = self.table.meta(SNAPSHOT_META)
        self.vectors_index.write(self.folder / name)
        self.table.set_meta(SNAPSHOT_META, name)
        self.table.set_meta(SNAPSHOT_SEGMENT_META, str(last))
        if old and old != name:
            (self.folder / old).unlink(missing_ok=True)

    def recover(self) -> None:
        """After a crash: drop orphan segment files and bring the manifest's count up to date."""
        self._require_writable()
        self.store.remove_orphans({s.id for s in self.table.segments()})
        if self.manifest.count != self.count:
            self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest = Manifest(**{**vars(self.manifest), "count": self.count})
        self.manifest.write(self.folder)

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.folder}: opened read-only")

    # -- checks ------------------------------------------------------------------------------

    def verify(self, fingerprint: str | None = None, sample: int = 20) -> list[str]:
        """Every problem found (empty when sound): counts across index, grids and table;
        segment checksums; the model fingerprint; a sample of items finding themselves first."""
        problems = []
        if self.vectors_index.ntotal - len(self.vectors_index.filtered) != self.count:
            problems.append(
                f"FAISS holds {self.vectors_index.ntotal - len(self.vectors_index.filtered)} "
                f"searchable vectors but the table has {self.count} live items"
            )
        if self.manifest.count != self.count:
            problems.append(f"manifest count {self.manifest.count} != table count {self.count}")
        for seg in self.table.segments():
            vpath, gpath = self.store.paths(seg.id)
            for path, digest in ((vpath, seg.vectors_sha256), (gpath, seg.grids_sha256)):
                if not path.is_file():
                    problems.append(f"{path.name}: missing")
                elif sha256_file(path) != digest:
                    problems.append(f"{path.name}: checksum mismatch (the file was altered)")
                elif len(self.store.arrays(seg.id)[0]) != seg.count:
                    problems.append(f"{path.name}: holds a different number of rows than recorded")
        if fingerprint is not None and fingerprint != self.manifest.fingerprint:
            problems.append(
                f"model fingerprint {self.manifest.fingerprint[:16]} != expected {fingerprint[:16]}"
            )
        if self.count and not problems:
            rng = np.random.default_rng(0)
            chosen = rng.choice(self.ids, size=min(sample, self.count), replace=False)
            _, found = self.search(self.vectors(chosen), k=1)
            for item_id, first in zip(chosen.tolist(), found[:, 0].tolist(), strict=True):
                if item_id != first:
                    problems.append(f"item {item_id} does not find itself first (found {first})")
        return problems


@contextlib.contextmanager
def writing(root: str | Path, expected_fingerprint: str | None = None) -> Iterator[GalleryIndex]:
    """Open the live version for writing under the writer lock; on the way out, write a new
    FAISS snapshot when many items were added since the last one. A ``root`` without an index
    raises :class:`IndexFormatError` before the lock is taken: nothing is created there."""
    root = Path(root)
    live_version(root)
    with writer_lock(root, create=False):
        index = GalleryIndex.open(root, expected_fingerprint, writable=True)
        try:
            index.recover()
            yield index
            if index.backlog() > max(SNAPSHOT_BACKLOG, index.count // 10):
                index.snapshot()
        finally:
            index.close()
