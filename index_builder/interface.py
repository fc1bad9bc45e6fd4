"""What both index implementations (a folder, :mod:`index_builder.gallery`, and a Qdrant
collection, :mod:`index_builder.qdrant_index`) share: the label filter a search takes and the
check that an index was built by the model loaded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelFilter:
    """Which items a search may return: those with one of ``labels`` (None: any label, items
    without one included) and none of ``exclude``."""

    labels: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.labels is not None or bool(self.exclude)


class FingerprintMismatchError(ValueError):
    """The index was built by another model than the one asked for."""


def require_fingerprint(where: object, found: str, expected: str | None) -> None:
    """Refuse an index that ``found``'s model built when the model loaded is ``expected``."""
    if expected is not None and found != expected:
        raise FingerprintMismatchError(
            f"{where}: the index was built by model {found[:16]}, but the model loaded here is "
            f"{expected[:16]}; rebuild the index with this model (`diml index build`) or use "
            "the checkpoint it was built with"
        )
