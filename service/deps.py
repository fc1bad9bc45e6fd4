"""Request dependencies: the loaded engine, API-key scopes (from :mod:`service.auth`), stage
timing, the request deadline."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from pydantic import BeforeValidator

from service.auth import Read, Write
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


def _digits_only(value: object) -> object:
    """Whole numbers in paths, queries and forms are written with digits only: Python's and
    pydantic's lax parsing would also take ``+5``, `` 1``, ``1_0`` and ``1.0``."""
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be a whole number written with the digits 0-9 only")
    return value


_DIGITS = re.compile(r"[0-9]{1,19}")
# Goes last in a parameter's Annotated[int, Query(...), DIGITS] (nesting Annotated types
# loses the bounds from FastAPI's OpenAPI schema).
DIGITS = BeforeValidator(_digits_only)
MAX_ID = 2**63 - 1
ItemId = Annotated[int, Path(ge=0, le=MAX_ID, description="a gallery item's id"), DIGITS]


def single_parts(*names: str) -> Any:
    """A dependency: each multipart field in ``names`` comes at most once (FastAPI would
    silently keep the last of several)."""

    async def check(request: Request) -> None:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return
        form = await request.form()  # already parsed for the endpoint: cached
        for name in names:
            if (count := len(form.getlist(name))) > 1:
                raise ApiError(422, "invalid_request", f"send one '{name}' part, not {count}")

    return Depends(check)


EngineDep = Annotated[Engine, Depends(get_engine)]
TimerDep = Annotated[StageTimer, Depends(get_timer)]

__all__ = [
    "DIGITS", "MAX_ID", "EngineDep", "ItemId", "Read", "TimerDep", "Write", "single_parts",
    "within_deadline",
]  # fmt: skip
