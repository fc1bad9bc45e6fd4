"""The engine's expected failures, in its own terms: ``service.errors`` gives each kind its HTTP
status and code, so that the engine knows nothing of HTTP."""

from __future__ import annotations


class EngineError(Exception):
    """An expected failure, said in the engine's terms; ``service.errors`` gives each kind its
    HTTP status and code (the engine knows nothing of HTTP)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFoundError(EngineError):
    """No live gallery item has the id asked for."""


class ReadOnlyError(EngineError):
    def __init__(self) -> None:
        super().__init__("this server cannot change the gallery now")


class EmptyUploadError(EngineError):
    pass


class UnusableImageError(EngineError):
    """An upload that is not an image this service accepts; ``kind`` as ImageLoadError's."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class OverloadedError(EngineError):
    """Too much work is waiting; the caller should retry shortly."""

    def __init__(self, what: str = "too many requests are waiting") -> None:
        super().__init__(f"{what}; retry shortly")


class DeadlineExceededError(EngineError):
    def __init__(self) -> None:
        super().__init__(
            "the request took too long and was dropped; send a smaller image or retry later"
        )
