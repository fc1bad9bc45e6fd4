"""Which methods a path accepts, answered the same way everywhere (RFC 9110).

- An item id's path segment matches digits only (:data:`ITEM_ID`), so that ``/gallery/labels``
  is never also an id route's path: a method that only an id route serves is not accepted
  there.
- HEAD is served wherever GET is, with the same status and headers and no body
  (:class:`HeadAsGet`): Starlette's own routes do so, FastAPI's serve only the methods they
  declare.
- OPTIONS is answered 204 with ``Allow`` on every path that exists (see
  :func:`service.errors.install`), and a 405 carries the same ``Allow``: both come from
  :func:`allowed_methods`, which asks the routes themselves. No CORS: OPTIONS carries no
  ``Access-Control-*`` headers, so browsers keep other origins out.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import BaseRoute, Match, Mount, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Methods a route of this service may serve; OPTIONS is answered for every path.
PROBED = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
STATIC_METHODS = frozenset({"GET", "HEAD"})  # what StaticFiles serves


class DigitsConvertor(Convertor[str]):
    """A path segment of digits only, kept as text: the route's parameter
    (:data:`service.deps.ItemId`) parses it and answers 422 when it is out of range (never
    Python's ``int`` on a 5,000-digit segment here, which would raise during routing)."""

    regex = "[0-9]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return str(value)


register_url_convertor("digits", DigitsConvertor())
ITEM_ID = "{item_id:digits}"  # the id routes' path segment: /gallery/{ITEM_ID}


def allowed_methods(scope: Scope) -> list[str]:
    """The methods the app in ``scope`` accepts at the request's path, sorted: those of every
    route that matches the path, HEAD wherever GET is, and OPTIONS when any; [] for a path
    that no route serves."""
    routes: list[BaseRoute] = scope["app"].router.routes
    # The path from the app's root: inside a mount, the scope's root_path is the mount's.
    root = scope.get("app_root_path", scope.get("root_path", ""))
    path = get_route_path({"path": scope["path"], "root_path": root})
    methods = {method for method in PROBED if any(_serves(r, path, method) for r in routes)}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods | {"OPTIONS"}) if methods else []


def _serves(route: BaseRoute, path: str, method: str) -> bool:
    """Whether ``route`` would take ``method path`` (its own ``matches``, so that path
    convertors and included routers count as they do for real requests)."""
    probe: Scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    match, _ = route.matches(probe)
    if isinstance(route, Mount):  # the static files: a mount matches any method
        return match is not Match.NONE and method in STATIC_METHODS
    return match is Match.FULL


class HeadAsGet:
    """ASGI middleware: a HEAD request on a path that serves GET is handled as that GET (the
    same checks, status and headers, ``Content-Length`` included) and the body is dropped;
    elsewhere HEAD goes on as it came, to its 405. The method is GET while the app works and
    HEAD again once the answer starts, for the server and the outer middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "HEAD"
            or ("GET" not in allowed_methods(scope))
        ):
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.start":
                scope["method"] = "HEAD"
            elif message["type"] in ("http.response.body", "http.response.pathsend"):
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        scope["method"] = "GET"
        try:
            await self.app(scope, receive, headers_only)
        finally:
            scope["method"] = "HEAD"
