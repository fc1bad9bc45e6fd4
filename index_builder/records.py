"""The records an image goes through on its way into an index, one shape per step.

:class:`Source` (where its bytes are, its key and label: from a folder scan, a list or an
upload) -> :class:`Decoded` (read, hashed and decoded for the model, or why it could not be)
-> :class:`Embedded` (its global vector and part grid, ready to add). :class:`EmbeddedBatch` is
what the one embedding loop (:mod:`index_builder.embedding`) gives per batch; :class:`Report`
what a build or an add did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index_builder.limits import text_problem
from index_builder.table import NewItem


@dataclass(frozen=True)
class Source:
    """An image to index: where its bytes are, the key users know it by, an optional label."""

    path: Path
    key: str
    label: str | None = None

    def __post_init__(self) -> None:
        if (problem := text_problem(self.key, self.label)) is not None:
            raise ValueError(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Decoded:
    """A source read, hashed and decoded for the model, or why it could not be.

    ``reason``: why it was not decoded ("" when it was); ``sha256`` of its bytes ("" when
    they could not be read); ``width`` and ``height`` of the original, upright (0 on failure);
    ``pixels`` (3, crop, crop) float32, normalised, for the embedding loop (None on failure,
    and once embedded where only the outcome travels on).
    """

    source: Source
    pixels: torch.Tensor | None = field(default=None, compare=False, repr=False)
    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str = ""

    def skipped(self) -> dict[str, str]:
        """The report's line for a source that could not be decoded."""
        return {"path": str(self.source.path), "reason": self.reason}


@dataclass(frozen=True)
class Embedded:
    """An image decoded and embedded, ready to add: its source, bytes' sha256, original size,
    global vector (D,) float32 and part grid (R, D). Compared and shown without the arrays."""

    source: Source
    sha256: str
    width: int
    height: int
    vector: np.ndarray = field(compare=False, repr=False)
    grid: np.ndarray = field(compare=False, repr=False)

    def item(self) -> NewItem:
        """The row the item table records for it."""
        source = self.source
        path, size = str(source.path), (self.width, self.height)
        return NewItem(source.key, path, source.label, self.sha256, *size)


@dataclass(frozen=True, eq=False)
class EmbeddedBatch:
    """One batch out of the embedding loop: the sources that decoded (``decoded``, in order),
    their ``vectors`` (n, D) float32 and ``grids`` (n, R, D) float16 in the same order, and
    those that ``failed``, each with its reason."""

    decoded: list[Decoded]
    vectors: np.ndarray
    grids: np.ndarray
    failed: list[Decoded]

    def embedded(self) -> list[Embedded]:
        """The decoded sources as :class:`Embedded` images, in order."""
        rows = zip(self.decoded, self.vectors, self.grids, strict=True)
        return [Embedded(d.source, d.sha256, d.width, d.height, v, g) for d, v, g in rows]

    def skipped(self) -> list[dict[str, str]]:
        """The report's lines for the sources that failed."""
        return [d.skipped() for d in self.failed]


@dataclass
class Report:
    """What a build or an add did."""

    indexed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    count: int = 0
    ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        rate = self.indexed / self.seconds if self.seconds else None
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(rate, 2) if rate else None,
            "count": self.count,
        }
