"""Request dependencies: the loaded engine, API-key scopes (from :mod:`service.auth`), stage
timing, the request deadline and answers built within it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request, Response
from pydantic import BaseModel, BeforeValidator

from service.auth import Read, Write
from service.engine import Engine
from service.errors import ApiError
from service.failures import DeadlineExceededError
from service.limits import check_deadline, deadline, in_thread
from service.metrics import StageTimer
from service.settings import Settings

T = TypeVar("T")


def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        if failure := getattr(request.app.state, "load_error", None):  # it will not recover
            raise ApiError(503, "load_failed", f"{failure}; the server log says why, and the "
                           "service will not be ready until it is fixed and restarted")  # fmt: skip
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


async def answer(
    engine: Engine,
    timer: StageTimer,
    schema: type[BaseModel],
    work: Coroutine[Any, Any, T],
    build: Callable[[T], Any],
) -> Response:
    """``work``, then the JSON answer that ``build`` makes of its result, all within the
    request's deadline (503 ``deadline_exceeded`` past it, as :func:`within_deadline`).

    The answer is built and serialised as ``response_model=schema`` with
    ``response_model_exclude_unset=True`` would, but in a thread and before the deadline: a
    large one no longer runs on after it (``build`` checks the deadline between its parts), nor
    holds the event loop while it is validated and written. Timed as the ``respond`` stage."""

    async def run() -> Response:
        result = await work
        with timer.stage("respond"):
            body = await in_thread(_json, schema, build, result)
        return Response(body, media_type="application/json",
                        headers={"Server-Timing": timer.header()})  # fmt: skip

    return await within_deadline(engine, run())


def _json(schema: type[BaseModel], build: Callable[[T], Any], result: T) -> bytes:
    content = build(result)
    check_deadline()
    model = schema.model_validate(content)
    return model.model_dump_json(by_alias=True, exclude_unset=True).encode()


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
    "DIGITS", "MAX_ID", "EngineDep", "ItemId", "Read", "TimerDep", "Write", "answer",
    "single_parts", "within_deadline",
]  # fmt: skip
