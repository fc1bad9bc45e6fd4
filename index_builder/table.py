"""The item table (SQLite): which items exist, where their part grids lie, what was skipped.

SQLite is the index's source of truth. An add writes its segment files first and then commits
their rows in one transaction, so an item exists exactly when its commit did (WAL journal,
``synchronous=FULL``: an acknowledged add survives a power cut or ``kill -9``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index_builder.manifest import now

TABLE = "items.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    path TEXT,
    label TEXT,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    added TEXT NOT NULL,
    segment INTEGER NOT NULL,
    row INTEGER NOT NULL,
    removed TEXT
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (sha256);
CREATE INDEX IF NOT EXISTS items_path ON items (path);
CREATE INDEX IF NOT EXISTS items_label ON items (label);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    vectors_sha256 TEXT NOT NULL,
    grids_sha256 TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Item:
    """One gallery item as the table records it."""

    id: int
    key: str
    path: str | None
    label: str | None
    sha256: str
    width: int
    height: int
    added: str


@dataclass(frozen=True)
class NewItem:
    """An item about to be added: where it came from, what its bytes hash to, its size."""

    key: str
    path: str | None
    label: str | None
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class SegmentInfo:
    id: int
    count: int
    vectors_sha256: str
    grids_sha256: str


class ItemTable:
    """A connection to ``items.sqlite`` in an index folder."""

    def __init__(self, folder: Path, readonly: bool = False) -> None:
        path = folder / TABLE
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self.db.close()

    # -- reads -------------------------------------------------------------------------------

    def count(self) -> int:
        return int(
            self.db.execute("SELECT COUNT(*) FROM items WHERE removed IS NULL").fetchone()[0]
        )

    def next_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM items").fetchone()[0])

    def next_segment(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM segments").fetchone()[0])

    def locations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Live items: ids (N,) int64 ascending, their segments (N,) and rows (N,)."""
        rows = self.db.execute(
            "SELECT id, segment, row FROM items WHERE removed IS NULL ORDER BY id"
        ).fetchall()
        array = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return array[:, 0].copy(), array[:, 1].copy(), array[:, 2].copy()

    def removed_ids(self) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM items WHERE removed IS NOT NULL").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def items(self, ids: Sequence[int]) -> dict[int, Item]:
        """The live items among ``ids``, by id."""
        found: dict[int, Item] = {}
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(
                "SELECT id, key, path, label, sha256, width, height, added FROM items "
                f"WHERE removed IS NULL AND id IN ({marks})",
                chunk,
            ):
                found[row[0]] = Item(*row)
        return found

    def ids_with_labels(self, labels: Sequence[str]) -> np.ndarray:
        """The live items whose label is one of ``labels``: ids (n,) int64 ascending."""
        wanted = sorted(set(labels))
        found: list[int] = []
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id FROM items WHERE removed IS NULL AND label IN ({marks})"
            found += [r[0] for r in self.db.execute(query, chunk)]
        return np.sort(np.asarray(found, dtype=np.int64))

    def labels(self) -> list[tuple[str, int]]:
        """Every label of a live item and how many items carry it, most common first."""
        query = (
            "SELECT label, COUNT(*) AS n FROM items WHERE removed IS NULL AND label IS NOT NULL "
            "GROUP BY label ORDER BY n DESC, label"
        )
        return [(r[0], int(r[1])) for r in self.db.execute(query)]

    def page(self, offset: int, limit: int) -> list[Item]:
        rows = self.db.execute(
            "SELECT id, key, path, label, sha256, width, height, added FROM items "
            "WHERE removed IS NULL "
            "ORDER BY id LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [Item(*row) for row in rows]

    def keys_by_sha256(self, digests: Iterable[str] | None = None) -> dict[str, str]:
        """sha256 -> key of the live item with those bytes, for ``digests`` (None: all)."""
        if digests is None:
            query = "SELECT sha256, key FROM items WHERE removed IS NULL"
            return dict(self.db.execute(query).fetchall())
        wanted = list(set(digests))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT sha256, key FROM items WHERE removed IS NULL AND sha256 IN ({marks})"
            found.update(self.db.execute(query, chunk).fetchall())
        return found

    def seen_paths(self) -> set[str]:
        """Paths already indexed or already skipped (what a resumed build need not look at)."""
        rows = self.db.execute("SELECT path FROM items UNION SELECT path FROM skipped").fetchall()
        return {r[0] for r in rows if r[0] is not None}

    def skipped(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, reason FROM skipped ORDER BY path"))

    def segments(self) -> list[SegmentInfo]:
        rows = self.db.execute(
            "SELECT id, count, vectors_sha256, grids_sha256 FROM segments ORDER BY id"
        )
        return [SegmentInfo(*row) for row in rows]

    def meta(self, name: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else default

    # -- writes: each method is one transaction ----------------------------------------------

    def commit_segment(
        self,
        segment: SegmentInfo,
        first_id: int,
        items: Sequence[NewItem],
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Record a written segment, its items (ids ``first_id ...``) and skipped files at once."""
        stamp = now()
        with self.db:
            self.db.execute(
                "INSERT INTO segments (id, count, vectors_sha256, grids_sha256, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (segment.id, segment.count, segment.vectors_sha256, segment.grids_sha256, stamp),
            )
            self.db.executemany(
                "INSERT INTO items (id, key, path, label, sha256, width, height, added, segment, "
                "row) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        first_id + row,
                        it.key,
                        it.path,
                        it.label,
                        it.sha256,
                        it.width,
                        it.height,
                        stamp,
                        segment.id,
                        row,
                    )
                    for row, it in enumerate(items)
                ],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO skipped (path, reason) VALUES (?, ?)", skipped
            )

    def record_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO skipped (path, reason) VALUES (?, ?)", skipped
            )

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Mark live items removed; returns the ids that were live."""
        live = sorted(self.items(ids))
        with self.db:
            self.db.executemany(
                "UPDATE items SET removed = ? WHERE id = ?", [(now(), i) for i in live]
            )
        return live

    def set_meta(self, name: str, value: str) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value)
            )
