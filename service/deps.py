"""Request dependencies: the loaded engine, API-key scopes (from :mod:`service.auth`), stage
timing, the request deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request

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


MAX_ID = 2**63 - 1
ItemId = Annotated[int, Path(ge=0, le=MAX_ID, description="a gallery item's id")]
EngineDep = Annotated[Engine, Depends(get_engine)]
TimerDep = Annotated[StageTimer, Depends(get_timer)]

__all__ = ["MAX_ID", "EngineDep", "ItemId", "Read", "TimerDep", "Write", "within_deadline"]
