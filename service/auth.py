"""API keys: who may read, who may change the gallery, who may scrape metrics.

Each route declares what it needs with a dependency (:data:`Read`, :data:`Write`,
:data:`MetricsRead`); :class:`AuthBeforeBody` applies the same declaration before the body is
read, so that no body is read for a client without the right key.

Gallery changes need a write key. Without write keys they are refused unless the operator
chose anonymous writes: ``loopback`` (from clients on this machine only) or ``any``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Mapping
from typing import Literal

from fastapi import Depends, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError
from service.limits import RefusedError, call_refusing
from service.settings import Settings

Need = Literal["read", "write", "metrics"]
ASK_FOR_KEY = "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def authorize(
    need: Need, settings: Settings, headers: Mapping[str, str], client: str | None
) -> None:
    """Raise 401/403 ApiError unless a request with ``headers`` from ``client`` may ``need``."""
    if need == "metrics":
        if not settings.protect_metrics:
            return
        need = "read"
    if need == "read":
        if not settings.read_keys:
            return
        key = _presented_key(headers)
        if key is None:
            raise ApiError(401, "unauthorized", f"this server needs an API key: {ASK_FOR_KEY}")
        if not _matches(key, settings.read_keys + settings.write_keys):
            raise ApiError(403, "forbidden", "this API key is not valid here")
        return
    if settings.write_keys:
        key = _presented_key(headers)
        if key is None:
            raise ApiError(401, "unauthorized", f"gallery changes need a write key: {ASK_FOR_KEY}")
        if not _matches(key, settings.write_keys):
            raise ApiError(403, "forbidden", "this API key may not change the gallery")
        return
    mode = settings.anonymous_writes
    if mode == "any" or (mode == "loopback" and _is_loopback(client)):
        return
    where = " from this machine" if mode == "loopback" else ""
    raise ApiError(403, "forbidden", f"gallery changes need a write key{where}: the operator "
                   "sets DIML_WRITE_KEYS (or DIML_ANONYMOUS_WRITES=loopback)")  # fmt: skip


def _presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request presents, where a key is needed. An ``Authorization`` header of
    another scheme is refused (401) rather than passed over for ``X-API-Key``: a credential
    the server cannot check is not silently ignored."""
    auth = headers.get("authorization")
    if auth is None:
        return headers.get("x-api-key")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    raise ApiError(401, "unauthorized", f"the Authorization header is not 'Bearer <key>': "
                   f"{ASK_FOR_KEY}")  # fmt: skip


def _matches(key: str, allowed: list[str]) -> bool:
    """Constant-time comparison against every allowed key (no early exit on a match)."""
    found = False
    for candidate in allowed:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _is_loopback(client: str | None) -> bool:
    try:
        return client is not None and ipaddress.ip_address(client).is_loopback
    except ValueError:
        return False


def _gate(need: Need) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        client = request.client.host if request.client else None
        authorize(need, request.app.state.settings, request.headers, client)

    check.__name__ = f"require_{need}"
    return check


require_read, require_write, require_metrics = _gate("read"), _gate("write"), _gate("metrics")
NEEDS: dict[Callable[[Request], None], Need] = {
    require_read: "read", require_write: "write", require_metrics: "metrics",
}  # fmt: skip
Read, Write, MetricsRead = Depends(require_read), Depends(require_write), Depends(require_metrics)


class AuthBeforeBody:
    """ASGI middleware: checks the keys a route's dependencies ask for when the app first asks
    for the request's body, after routing and before a byte of the body is read (FastAPI
    parses a form before it runs any dependency). A refusal is the usual JSON error, with
    ``Connection: close``; requests that never read a body are left to the dependencies."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        checked = False

        async def gated_receive() -> Message:
            nonlocal checked
            if not checked:
                checked = True
                client = scope.get("client")
                try:
                    for need in _needs(scope.get("route")):
                        authorize(need, self.settings, Headers(scope=scope), client and client[0])
                except ApiError as e:
                    raise RefusedError(e.status, e.code, e.message) from e
            return await receive()

        await call_refusing(self.app, scope, gated_receive, send)


def _needs(route: object) -> list[Need]:
    dependant = getattr(route, "dependant", None)
    calls = [d.call for d in dependant.dependencies] if dependant is not None else []
    return [NEEDS[c] for c in calls if c in NEEDS]
