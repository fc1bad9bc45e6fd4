"""Segments: append-only files of global vectors and part grids, one pair per add or build chunk.

Segment ``s`` is ``segments/{s:06d}.vectors.npy`` (n, D) float32 and ``{s:06d}.grids.npy``,
(n,) records of int8 codes (R, D) and a float32 scale per part (:mod:`model.quantization`;
indexes written before it hold (n, R, D) float16, read alike); row ``r`` of both belongs to the
item whose table row says (segment s, row r).
Files are written aside, fsynced and renamed before the table commits them, and memory-mapped
when read, so gathering K candidates' grids reads K rows, never the whole store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index_builder.files import save_npy_atomic
from index_builder.table import SegmentInfo
from model.files import sha256_file
from model.quantization import pack, unpack

FOLDER = "segments"


class SegmentStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder / FOLDER
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def paths(self, segment: int) -> tuple[Path, Path]:
        return (
            self.folder / f"{segment:06d}.vectors.npy",
            self.folder / f"{segment:06d}.grids.npy",
        )

    def write(self, segment: int, vectors: np.ndarray, grids: np.ndarray) -> SegmentInfo:
        """vectors: (n, D) float32; grids: (n, R, D) float -> the segment's record (the grids
        stored as int8 with a scale per part)."""
        if vectors.ndim != 2 or grids.ndim != 3 or len(vectors) != len(grids):
            raise ValueError(
                f"a segment needs vectors (n, D) and grids (n, R, D), got {vectors.shape} and "
                f"{grids.shape}"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        vpath, gpath = self.paths(segment)
        save_npy_atomic(vpath, vectors.astype(np.float32, copy=False))
        save_npy_atomic(gpath, pack(grids))
        return SegmentInfo(segment, len(vectors), sha256_file(vpath), sha256_file(gpath))

    def arrays(self, segment: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (vectors (n, D), grids (n, R, D)) of one segment."""
        if segment not in self._open:
            vpath, gpath = self.paths(segment)
            self._open[segment] = (np.load(vpath, mmap_mode="r"), np.load(gpath, mmap_mode="r"))
        return self._open[segment]

    def grid_storage(self, segment: int) -> str:
        """How the segment keeps its grids: "int8" (with scales) or "float16" (older indexes)."""
        return "int8" if self.arrays(segment)[1].dtype.names else "float16"

    def gather(self, segments: np.ndarray, rows: np.ndarray, grids: bool = True) -> np.ndarray:
        """Rows of several segments, in the order given: (n, R, D) float16 grids (the stored
        values, dequantized), or with ``grids=False`` (n, D) float32 vectors. One
        fancy-indexed read per segment involved."""
        which = 1 if grids else 0
        if len(segments) == 0:
            return np.zeros((0,), dtype=np.float16 if grids else np.float32)
        out: np.ndarray | None = None
        for segment in np.unique(segments):
            mask = segments == segment
            found = self._rows(int(segment), which, rows[mask])
            if out is None:
                out = np.empty((len(segments), *found.shape[1:]), dtype=found.dtype)
            out[mask] = found
        assert out is not None
        return out

    def _rows(self, segment: int, which: int, rows: np.ndarray) -> np.ndarray:
        found = self.arrays(segment)[which][rows]
        return unpack(found) if which == 1 else found

    def remove_orphans(self, known: set[int]) -> None:
        """Delete segment files that no committed segment owns (left by a crash before commit)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.glob("*.npy"):
            if int(path.name.split(".")[0]) not in known:
                path.unlink()
