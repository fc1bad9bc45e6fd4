"""The HTTP server that ``diml serve`` runs (and so the container): uvicorn, with its h11
protocol extended where hostile or merely numerous clients found gaps.

- **Connection limit.** uvicorn, past ``limit_concurrency``, answers in plain text and closes
  at once, while the client is still sending its request: the kernel answers the bytes still
  coming with a reset, and the client, busy sending, sees the reset instead of the 503. It
  also counts every open connection when a request arrives, so a burst past the limit gets
  nearly every request refused. Here the first ``max_connections`` connections, in the order
  they open, hold a place until they close; a request on a connection without a place gets
  the usual JSON error, 503 ``overloaded`` with ``Retry-After``.
- **Answers given before the body has all arrived** (that 503, and the 401, 413 and 408 that
  refuse a request early) are followed by reading and dropping the rest of the body for a few
  seconds, so that the connection ends with the client's request sent and the answer read.
- **Request heads have a deadline** (``header_timeout_s``): uvicorn has none, and a client that
  sends its request line and headers a byte at a time would hold its connection, and a place,
  forever. Idle kept-alive connections stay governed by ``keep_alive_s``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import error_response
from service.settings import Settings

log = logging.getLogger(__name__)

# The rest of a body nobody will use is read for at most LINGER_S, or until it pauses for
# LINGER_PAUSE_S: long enough for a client that is sending to finish, short enough that
# refused connections do not pile up.
LINGER_S = 5.0
LINGER_PAUSE_S = 1.0


def serve(app: ASGIApp, settings: Settings, host: str, port: int) -> None:
    """Run ``app`` on ``host:port`` until interrupted."""
    uvicorn.Server(ServerConfig(app, settings, host=host, port=port, log_level="info")).run()


class Places:
    """At most ``limit`` connections served at once. A connection takes a place when it opens
    (or, when none was free then, at its next request) and gives it back when it closes.
    ``running`` counts the requests being served, those whose client left included: they
    too are bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.holders: set[object] = set()
        self.running = 0

    def take(self, holder: object) -> bool:
        """Whether ``holder`` has a place, taking a free one if it had none."""
        if holder not in self.holders:
            if len(self.holders) >= self.limit:
                return False
            self.holders.add(holder)
        return True

    def give_back(self, holder: object) -> None:
        self.holders.discard(holder)


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration with :class:`Protocol` and what it reads: the places, the head
    deadline and the two answers it gives itself."""

    def __init__(self, app: ASGIApp, settings: Settings, **kwargs: Any) -> None:
        super().__init__(app, http=Protocol, server_header=False,
                         timeout_keep_alive=settings.keep_alive_s, **kwargs)  # fmt: skip
        self.places = Places(settings.max_connections)
        self.header_timeout_s = settings.header_timeout_s
        self.over_limit = error_response(
            503, "overloaded", f"the server is serving as many connections as it may "
            f"({settings.max_connections}); retry shortly",
            {"Retry-After": "1", "Connection": "close"},
        )  # fmt: skip
        self.head_timeout = _raw(
            408, "Request Timeout", "request_timeout", f"the request line and headers took "
            f"over {settings.header_timeout_s:g} s; send them at once",
        )  # fmt: skip


def _raw(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 JSON error answer that closes the connection, as bytes, for a client
    whose request never got as far as uvicorn's request-response cycle."""
    response = error_response(status, code, message, {"Connection": "close"})
    head = [f"HTTP/1.1 {status} {reason}".encode()]
    head += [name + b": " + value for name, value in response.raw_headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with connection places, a deadline on request heads and a
    lingering close (see the module's docstring)."""

    def __init__(self, config: ServerConfig, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        self.server_config = config
        self.head_timer: asyncio.TimerHandle | None = None
        self.serve_app = self.app
        self.app = self.admit

    # -- places -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.server_config.places.take(self)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_config.places.give_back(self)
        self._stop_head_timer()
        super().connection_lost(exc)

    async def admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request when its connection has a place and the requests in progress
        (those whose clients left included) are within the limit; else answer 503."""
        places = self.server_config.places
        gone = self.transport.is_closing()  # the client left: a place taken now would never return
        if gone or not places.take(self) or places.running >= places.limit:
            if not gone:
                log.warning("over the connection limit (%d): answered 503", places.limit)
            await self._answer_then_drop_the_body(self.server_config.over_limit, scope,
                                                  receive, send)  # fmt: skip
            return
        places.running += 1
        try:
            await self._answer_then_drop_the_body(self.serve_app, scope, receive, send)
        finally:
            places.running -= 1

    # -- lingering close ----------------------------------------------------------------------

    async def _answer_then_drop_the_body(
        self, app: ASGIApp, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run ``app``; when it answers before the request body has all arrived, the answer
        goes out whole, then the rest of the body is read and dropped before the response is
        complete (uvicorn closes at once after it, and closing while bytes still come makes
        the kernel reset the connection, which the client sees instead of the answer)."""
        body_done = False

        async def tracked_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def lingering_send(message: Message) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if not last or body_done:
                await send(message)
                return
            await send({**message, "more_body": True})
            complete = await _drop_body(tracked_receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if not complete:  # a client still sending after LINGER_S: not kept alive
                self.transport.close()

        await app(scope, tracked_receive, lingering_send)

    # -- request heads ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.head_timer is None:  # the first bytes of a head (after a kept-alive pause)
                self._await_head()
        else:
            self._stop_head_timer()

    def _await_head(self) -> None:
        timeout = self.server_config.header_timeout_s
        self.head_timer = self.loop.call_later(timeout, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_too_slow(self) -> None:
        """Close a connection whose request line and headers did not all come in time: with a
        408 when part of them came, silently when nothing did (as an idle kept-alive one)."""
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self.transport.write(self.server_config.head_timeout)
        self.transport.close()


async def _drop_body(receive: Receive) -> bool:
    """Read and drop the rest of a request body for up to LINGER_S, while it keeps coming;
    whether it all came (or the client left)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + LINGER_S
    while (left := give_up - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), min(LINGER_PAUSE_S, left))
        except TimeoutError:
            return False
        if message["type"] != "http.request" or not message.get("more_body", False):
            return True
    return False
