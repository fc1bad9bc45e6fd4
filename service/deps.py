"""Request dependencies: the loaded engine, API-key scopes, stage timing."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request

from service.engine import DeadlineExceededError, Engine
from service.errors import ApiError
from service.limits import deadline
from service.metrics import StageTimer
from service.settings import Settings

T = TypeVar("T")


def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ApiError(503, "not_ready", "the model and index are still loading; retry shortly",
                       {"Retry-After": "5"})  # fmt: skip
    return engine


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _matches(key: str | None, allowed: list[str]) -> bool:
    """Constant-time comparison against every allowed key (no early exit on a match)."""
    if key is None:
        return False
    found = False
    for candidate in allowed:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def require_read(request: Request) -> None:
    settings = get_app_settings(request)
    if not settings.read_keys:
        return
    key = _presented_key(request)
    if key is None:
        raise ApiError(401, "unauthorized", "this server needs an API key: send "
                       "'Authorization: Bearer <key>' or 'X-API-Key: <key>'")  # fmt: skip
    if not _matches(key, settings.read_keys + settings.write_keys):
        raise ApiError(403, "forbidden", "this API key is not valid here")


def require_write(request: Request) -> None:
    settings = get_app_settings(request)
    if not settings.auth_enabled:
        return
    if not settings.write_keys:
        raise ApiError(403, "forbidden", "gallery changes are disabled: no write key is set")
    key = _presented_key(request)
    if key is None:
        raise ApiError(401, "unauthorized", "gallery changes need a write API key: send "
                       "'Authorization: Bearer <key>' or 'X-API-Key: <key>'")  # fmt: skip
    if not _matches(key, settings.write_keys):
        raise ApiError(403, "forbidden", "this API key may not change the gallery")


async def within_deadline(engine: Engine, work: Coroutine[Any, Any, T]) -> T:
    """``work``, or 503 ``deadline_exceeded`` once the request's time is up.

    The work sees the deadline (:func:`service.limits.time_left`): decoding and embedding that
    have not started by then are never started. No ``Retry-After``: the same request would
    most likely time out again.
    """
    timeout = engine.settings.request_timeout_s
    try:
        with deadline(timeout):  # copied into the task below and into the threads it uses
            return await asyncio.wait_for(work, timeout=timeout)
    except TimeoutError as e:
        raise DeadlineExceededError from e


def get_timer(request: Request) -> StageTimer:
    timer = StageTimer(request.app.state.metrics)
    request.state.timer = timer
    return timer


MAX_ID = 2**63 - 1
ItemId = Annotated[int, Path(ge=0, le=MAX_ID, description="a gallery item's id")]
EngineDep = Annotated[Engine, Depends(get_engine)]
TimerDep = Annotated[StageTimer, Depends(get_timer)]
Read = Depends(require_read)
Write = Depends(require_write)
