"""``manifest.json``: what an index artefact holds and which model made it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index_builder.files import write_atomic

if TYPE_CHECKING:
    from model.network import EmbeddingNet

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class IndexFormatError(ValueError):
    """An index folder is missing, damaged, or of another version; the message says which."""


@dataclass(frozen=True)
class Manifest:
    """The artefact's description. ``count`` is the number of live items at the last write."""

    fingerprint: str
    backbone: str
    grid: int
    dim: int
    factory: str
    count: int
    model_config: dict[str, Any]
    created: str = field(default_factory=lambda: now())
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def of_model(cls, model: EmbeddingNet, fingerprint: str, factory: str, count: int) -> Manifest:
        """The manifest of an index of ``count`` embeddings by ``model`` (whose
        :func:`model.checkpoint.fingerprint` is ``fingerprint``) in a ``factory`` index."""
        config = model.config
        return cls(fingerprint=fingerprint, backbone=config.backbone, grid=config.grid,
                   dim=model.dim, factory=factory, count=count,
                   model_config=config.to_dict())  # fmt: skip

    @property
    def regions(self) -> int:
        return self.grid * self.grid

    def check_rows(self, n: int, vectors: np.ndarray, grids: np.ndarray) -> None:
        """ValueError unless ``vectors`` is (n, D) and ``grids`` (n, R, D) for this index."""
        if vectors.shape != (n, self.dim) or grids.shape != (n, self.regions, self.dim):
            raise ValueError(
                f"add needs vectors ({n}, {self.dim}) and grids ({n}, {self.regions}, "
                f"{self.dim}); got {vectors.shape} and {grids.shape}"
            )

    def write(self, folder: Path) -> None:
        write_atomic(folder / MANIFEST, (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise IndexFormatError(f"{folder}: no {MANIFEST}; not an index folder") from e
        except (OSError, json.JSONDecodeError) as e:
            raise IndexFormatError(f"{path}: unreadable ({e}); rebuild the index") from e
        if data.get("schema_version") != SCHEMA_VERSION:
            raise IndexFormatError(
                f"{path}: schema version {data.get('schema_version')!r}; this release reads "
                f"version {SCHEMA_VERSION}: rebuild the index with `diml index build`"
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise IndexFormatError(f"{path}: not a manifest of this release ({e})") from e


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
