"""One error shape for every failure: ``{"error": {"code": ..., "message": ...}}``.

Messages say what was wrong and what is accepted; they never carry paths, versions or
tracebacks. Anything unexpected is logged here and answered with a plain 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.failures import (
    DeadlineExceededError,
    EmptyUploadError,
    EngineError,
    NotFoundError,
    OverloadedError,
    ReadOnlyError,
    UnusableImageError,
)
from service.routing import allowed_methods

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An expected failure, answered with ``status`` and a stable machine-readable ``code``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


# The engine's failures as HTTP: status and code by kind (the engine does not speak HTTP).
ENGINE_ERRORS: dict[type[EngineError], tuple[int, str]] = {
    NotFoundError: (404, "not_found"),
    EmptyUploadError: (422, "empty_upload"),
    ReadOnlyError: (503, "read_only"),
    OverloadedError: (503, "overloaded"),
    DeadlineExceededError: (503, "deadline_exceeded"),
}
# An unusable upload, by the image loader's kind of refusal.
IMAGE_ERRORS = {
    "not_image": (415, "unsupported_media_type"),
    "format": (415, "unsupported_media_type"),
    "too_many_pixels": (413, "too_many_pixels"),
    "aspect_ratio": (422, "unsupported_aspect_ratio"),
    "too_many_scans": (422, "too_many_scans"),
    "metadata": (422, "too_much_metadata"),
    "too_many_elements": (422, "too_many_elements"),
    "corrupt": (422, "corrupt_image"),
    "unreadable": (422, "corrupt_image"),
}


def engine_error_response(exc: EngineError) -> JSONResponse:
    if isinstance(exc, UnusableImageError):
        status, code = IMAGE_ERRORS.get(exc.kind, (422, "corrupt_image"))
    else:
        status, code = ENGINE_ERRORS.get(type(exc), (500, "internal_error"))
    headers = {"Retry-After": "1"} if isinstance(exc, OverloadedError) else None
    return error_response(status, code, exc.message, headers)


STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return engine_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and (allowed := allowed_methods(request.scope)):
            if request.method == "OPTIONS":  # no route declares it: every path answers it
                return Response(status_code=204, headers={"Allow": ", ".join(allowed)})
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            message = f"{request.method} is not allowed here; use {', '.join(allowed)}"
        return error_response(exc.status_code, code, message, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the server failed; the error was logged")
