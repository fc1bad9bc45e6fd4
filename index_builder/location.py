"""Where an index lives: a folder, or a Qdrant collection.

- a folder path: the embedded default (FAISS + memory-mapped grids + SQLite);
- ``qdrant://HOST[:PORT]/COLLECTION`` (``qdrants://`` for TLS): a Qdrant server or cluster, API
  key from ``DIML_QDRANT_API_KEY``;
- ``qdrant-local:PATH[#COLLECTION]``: qdrant-client's embedded local mode (the same client code,
  in-process and brute force): small galleries and tests. The collection defaults to
  ``gallery``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_COLLECTION = "gallery"
DEFAULT_PORT = 6333
_REMOTE = re.compile(r"(qdrants?):/{1,2}([^/:]+)(?::(\d{1,5}))?/([A-Za-z0-9_.-]{1,255})/?")
_LOCAL = re.compile(r"qdrant-local:(.+?)(?:#([A-Za-z0-9_.-]{1,255}))?")


@dataclass(frozen=True)
class QdrantLocation:
    """A Qdrant collection: on a server (``host``) or in a local folder (``path``)."""

    collection: str
    host: str | None = None
    port: int = DEFAULT_PORT
    https: bool = False
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            suffix = "" if self.collection == DEFAULT_COLLECTION else f"#{self.collection}"
            return f"qdrant-local:{self.path}{suffix}"
        scheme = "qdrants" if self.https else "qdrant"
        return f"{scheme}://{self.host}:{self.port}/{self.collection}"

    def client_arguments(self) -> dict[str, object]:
        if self.path is not None:
            return {"path": str(self.path)}
        key = os.environ.get("DIML_QDRANT_API_KEY") or None
        return {"host": self.host, "port": self.port, "https": self.https, "api_key": key}


Location = Path | QdrantLocation


def parse_location(text: str | Path | QdrantLocation) -> Location:
    """A folder path or a Qdrant location; ValueError for a ``qdrant`` URL it cannot read.
    (A Qdrant location is taken as it is; ``qdrant:/`` with one slash, as a path object
    prints a URL, is read as ``qdrant://``.)"""
    if isinstance(text, QdrantLocation):
        return text
    raw = str(text)
    if raw.startswith(("qdrant:", "qdrants:")):
        match = _REMOTE.fullmatch(raw)
        if match is None:
            raise ValueError(
                f"{raw!r} is not a Qdrant location; write qdrant://HOST[:PORT]/COLLECTION "
                "(qdrants:// for TLS) or qdrant-local:PATH"
            )
        scheme, host, port, collection = match.groups()
        return QdrantLocation(collection, host, int(port or DEFAULT_PORT), scheme == "qdrants")
    if raw.startswith("qdrant-local:"):
        match = _LOCAL.fullmatch(raw)
        if match is None:
            raise ValueError(f"{raw!r}: write qdrant-local:PATH or qdrant-local:PATH#COLLECTION")
        path, collection = match.groups()
        return QdrantLocation(collection or DEFAULT_COLLECTION, path=Path(path))
    return Path(text)
