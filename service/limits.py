"""Bounds on what one request may cost: its body (enforced while it streams in, chunked uploads
included), its deadline (seen by the work it started, in any thread), and the memory that
decoding images takes across all requests at once."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.failures import DeadlineExceededError

T = TypeVar("T")

_DEADLINE: ContextVar[float | None] = ContextVar("diml_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within the block, the current request must be answered within ``seconds`` from now.
    Work started there (tasks, thread-pool calls) sees the deadline through :func:`time_left`."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds until the current request's deadline (negative past it); None without one."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def check_deadline() -> float | None:
    """Seconds left to the current request (None without a deadline); raises
    :class:`~service.failures.DeadlineExceededError` past it. Long work calls it between its
    steps, so that it stops at the deadline rather than runs on."""
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceededError
    return left


def return_freed_images_to_the_system() -> None:
    """Make glibc give the memory of freed images back to the system.

    glibc serves allocations over its mmap threshold as their own mappings, unmapped on free,
    but it raises that threshold to the size of each such block freed (up to 32 MB): after
    the first large image, decoded images come from per-thread heaps that do not shrink, and
    the process keeps the peak of every burst of uploads. A fixed 1 MiB threshold (which also
    turns the raising off) keeps the resident size close to what is in use. No-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # musl and others: their allocators differ
        return


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in the thread pool, finished even when the caller is cancelled.

    A thread cannot be stopped half-way. When the request's deadline cancels the await, the
    cancellation waits until ``func`` has returned, so a request's work never outlives its
    answer (the 503 comes once the work has actually stopped, not while it runs on).
    """
    future = asyncio.ensure_future(run_in_threadpool(func, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


class BudgetExhaustedError(Exception):
    """No room in a :class:`MemoryBudget` before the wait's timeout."""


class MemoryBudget:
    """A counting semaphore over bytes: reservations wait until what they ask for fits.

    A reservation larger than the whole budget waits for all of it (so it runs alone rather
    than never). Used to bound the memory that concurrent image decoding holds.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, size: int, timeout: float) -> Iterator[None]:
        """Hold ``size`` bytes of the budget for the ``with`` block; waits up to ``timeout``
        seconds for room, then raises :class:`BudgetExhaustedError`."""
        size = min(size, self.capacity)
        with self._changed:
            if not self._changed.wait_for(lambda: self.used + size <= self.capacity, timeout):
                raise BudgetExhaustedError
            self.used += size
        try:
            yield
        finally:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


class RefusedError(Exception):
    """Raised by a middleware's ``receive`` wrapper: the request is answered with this error
    (see :func:`call_refusing`) instead of whatever the app makes of the broken read."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def call_refusing(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app`` with ``receive``, which may raise :class:`RefusedError`. Then the refusal goes
    out as the JSON error with ``Connection: close``, in place of the app's own answer (it may
    turn the interrupted read into one, e.g. a 400 for a broken form)."""
    refusal: RefusedError | None = None
    answered = False

    async def tracking_receive() -> Message:
        nonlocal refusal
        try:
            return await receive()
        except RefusedError as e:
            refusal = e
            raise

    async def answer() -> None:
        nonlocal answered
        if not answered and refusal is not None:
            answered = True
            await refuse(scope, send, refusal)

    async def guarded_send(message: Message) -> None:
        if refusal is None:
            await send(message)
        else:
            await answer()

    try:
        await app(scope, tracking_receive, guarded_send)
    except RefusedError:
        await answer()


async def refuse(scope: Scope, send: Send, refusal: RefusedError) -> None:
    """Answer with ``refusal`` as the JSON error shape, closing the connection."""
    response = error_response(
        refusal.status, refusal.code, refusal.message, {"Connection": "close"}
    )
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class BodyLimits:
    """ASGI middleware: a request body may hold at most ``limit`` bytes and must arrive within
    ``total_s`` seconds, with no pause longer than ``idle_s``.

    A declared ``Content-Length`` over the limit is refused before reading anything (413);
    otherwise bytes are counted as they arrive, so a chunked upload is stopped at the limit
    rather than buffered whole. A client that sends its body too slowly gets 408. Either
    answer closes the connection. Once the body is complete, ``receive`` is left alone (the
    app may wait on it for a disconnect).
    """

    def __init__(self, app: ASGIApp, limit: int, total_s: float, idle_s: float) -> None:
        self.app, self.limit, self.total_s, self.idle_s = app, limit, total_s, idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await refuse(scope, send, RefusedError(413, "too_large", self._too_large()))
            return
        received = 0
        complete = False
        give_up = time.monotonic() + self.total_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            wait = min(self.idle_s, give_up - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                raise RefusedError(408, "request_timeout", "the request body arrived too "
                    f"slowly (allowed: {self.total_s:g} s in all, pauses under "
                    f"{self.idle_s:g} s); retry on a faster connection") from None  # fmt: skip
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.limit:
                    raise RefusedError(413, "too_large", self._too_large())
            else:
                complete = True
            return message

        await call_refusing(self.app, scope, limited_receive, send)

    def _too_large(self) -> str:
        return f"the request body is over the limit of {self.limit:,} bytes; send a smaller image"
