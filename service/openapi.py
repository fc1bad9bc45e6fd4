"""The OpenAPI schema, made to say what the service does where FastAPI's generated one cannot.

- **Which operations need a key, on this server** (``security``, with the ``Authorization:
  Bearer`` and ``X-API-Key`` headers as its schemes): from the same declaration the routes
  enforce (:data:`service.auth.Read`, ``Write``, ``MetricsRead``) and the keys this server has.
  A server without read keys serves searches to anyone, and its schema says so.
- **A malformed body is answered 400**: every operation that takes a multipart form may answer
  ``400 bad_request`` (Starlette refuses a form it cannot parse before any route code runs),
  which no route declares.
- **Form fields are never null**: FastAPI writes an optional field as ``anyOf: [X, null]``,
  but a multipart form has no null; an optional field is one that may be left out (it is not
  in ``required``). A client that sent the text ``null`` would be refused.
- **A required repeated form field needs at least one part**: ``images: []`` is no part at
  all, so the field is missing (``minItems: 1``).
- **Integer bounds are integers**: FastAPI writes a form field's ``ge``/``le`` as floats, and
  ``2**63 - 1`` as a float is ``2**63``, one past the largest id the service takes.
- **File parts are images** (``encoding: contentType: image/*``): what the service decodes
  is read from the bytes, whatever the part's own Content-Type says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import fastapi.routing
from fastapi import FastAPI

from service.auth import NEEDS
from service.deps import MAX_ID
from service.settings import Settings

FORM = "multipart/form-data"
MALFORMED_BODY = {
    "description": "the body is not a well-formed multipart/form-data form",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}
SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the same"},
}
A_KEY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]  # either header


def install(app: FastAPI) -> None:
    """``app.openapi()`` returns the generated schema with the corrections above (made once,
    then cached as FastAPI caches it)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            correct_forms(schema)
            document_keys(schema, app)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def correct_forms(schema: dict[str, Any]) -> None:
    """The corrections to every operation that takes a form, in place."""
    components = schema.get("components", {}).get("schemas", {})
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get(FORM)
            if form is None:
                continue
            operation["responses"].setdefault("400", MALFORMED_BODY)
            body = _resolve(form.get("schema", {}), components)
            _correct_fields(body)
            form["encoding"] = {name: {"contentType": "image/*"}
                                for name, field in body.get("properties", {}).items()
                                if _is_file(field)}  # fmt: skip
            if not form["encoding"]:
                del form["encoding"]


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return components.get(ref.rsplit("/", 1)[-1], schema) if ref else schema


def _correct_fields(body: dict[str, Any]) -> None:
    """A form's fields: not nullable, and at least one part for a required repeated one."""
    required = set(body.get("required", []))
    for name, field in body.get("properties", {}).items():
        alternatives = field.get("anyOf", [])
        kept = [a for a in alternatives if a.get("type") != "null"]
        if len(kept) == 1 and len(alternatives) == 2:
            del field["anyOf"]
            field.update(kept[0])
        if name in required and field.get("type") == "array":
            field.setdefault("minItems", 1)
        if field.get("type") == "integer":
            _integer_bounds(field)


def _integer_bounds(field: dict[str, Any]) -> None:
    if isinstance(low := field.get("minimum"), float):
        field["minimum"] = math.ceil(low)
    if isinstance(high := field.get("maximum"), float):
        field["maximum"] = min(math.floor(high), MAX_ID)  # no integer here goes past an id


def _is_file(field: dict[str, Any]) -> bool:
    """A binary field, or a list of them (OpenAPI 3.1 spells binary as a content media type)."""
    item = field.get("items", field)
    return bool(
        item.get("format") == "binary" or item.get("contentMediaType") == "application/octet-stream"
    )


def document_keys(schema: dict[str, Any], app: FastAPI) -> None:
    """``security`` on each operation that needs a key on this server (its settings)."""
    settings: Settings = app.state.settings
    keyed = {"read": bool(settings.read_keys), "write": bool(settings.write_keys),
             "metrics": settings.protect_metrics}  # fmt: skip
    for route in _routes(app):
        if not any(keyed[need] for need in _needs(route)):
            continue
        for method in route.methods or ():
            operation = schema["paths"].get(route.path_format, {}).get(method.lower())
            if operation is not None:
                operation["security"] = A_KEY
                schema.setdefault("components", {})["securitySchemes"] = SCHEMES


def _routes(app: FastAPI) -> list[Any]:
    """Every route with its effective path and dependencies: newer FastAPI keeps included
    routers whole (``iter_route_contexts`` expands them), older copies their routes in."""
    expand = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(expand(app.routes)) if expand is not None else list(app.routes)


def _needs(route: Any) -> list[str]:
    """What the route's dependencies ask for: "read", "write", "metrics" (as
    :class:`service.auth.AuthBeforeBody` reads them)."""
    dependant = getattr(route, "dependant", None)
    calls = [d.call for d in dependant.dependencies] if dependant is not None else []
    return [NEEDS[call] for call in calls if call in NEEDS]
