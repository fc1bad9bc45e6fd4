"""HTTP that tells the truth about methods (RFC 9110): HEAD wherever GET is, OPTIONS and 405
with ``Allow`` naming exactly what the path accepts; and the OpenAPI schema's own corrections
(:mod:`service.openapi`), each checked against what the server does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.deps import MAX_ID
from tests.service.conftest import settings_for

GET_ONLY = "GET, HEAD, OPTIONS"
# Every path the service serves (one of each route), and exactly the methods it accepts.
ALLOW = {
    "/search": "OPTIONS, POST",
    "/search/batch": "OPTIONS, POST",
    "/search/by-id/1": "OPTIONS, POST",
    "/search/examples": "OPTIONS, POST",
    "/explain": "GET, HEAD, OPTIONS, POST",
    "/gallery": "GET, HEAD, OPTIONS, POST",
    "/gallery/labels": GET_ONLY,
    "/gallery/1": "DELETE, GET, HEAD, OPTIONS",
    "/gallery/1/image": GET_ONLY,
    "/duplicates": GET_ONLY,
    "/healthz": GET_ONLY,
    "/readyz": GET_ONLY,
    "/metrics": GET_ONLY,
    "/": GET_ONLY,
    "/static/index.html": GET_ONLY,
    "/openapi.json": GET_ONLY,
    "/docs": GET_ONLY,
}
TRIED = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "TRACE")
HEAD_PATHS = [path for path, allowed in ALLOW.items() if "HEAD" in allowed]
READ = "read-key"


@pytest.fixture(scope="module")
def client(served: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(served), load_in_background=False)) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(served: dict[str, Path]) -> Iterator[TestClient]:
    settings = settings_for(served, read_keys=[READ], protect_metrics=True)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        yield c


@pytest.mark.parametrize("path", HEAD_PATHS)
def test_head_is_get_without_the_body(client: TestClient, path: str) -> None:
    query = {"a_id": 1, "b_id": 2} if path == "/explain" else None
    head, get = client.head(path, params=query), client.get(path, params=query)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # its counters moved between the two
        assert head.headers["content-length"] == get.headers["content-length"]


def test_head_is_refused_as_get_is(keyed: TestClient) -> None:
    head, get = keyed.head("/gallery/1"), keyed.get("/gallery/1")
    assert head.status_code == get.status_code == 401
    assert head.content == b""
    assert keyed.head("/gallery/1", headers={"X-API-Key": READ}).status_code == 200


@pytest.mark.parametrize("path", ALLOW)
def test_options_and_405_name_exactly_the_methods_the_path_accepts(
    client: TestClient, path: str
) -> None:
    options = client.options(path)
    assert options.status_code == 204
    assert options.headers["allow"] == ALLOW[path]
    assert options.content == b""
    assert not any(name.startswith("access-control-") for name in options.headers)  # no CORS
    for method in TRIED:
        if method in ALLOW[path]:
            continue
        refused = client.request(method, path)
        assert refused.status_code == 405, method
        assert refused.headers["allow"] == ALLOW[path], method
        if method != "HEAD":
            assert refused.json()["error"]["code"] == "method_not_allowed"


def test_allow_agrees_with_the_openapi_schema(client: TestClient) -> None:
    """Every documented path answers OPTIONS with its documented methods (HEAD with GET)."""
    for template, operations in client.get("/openapi.json").json()["paths"].items():
        methods = {m.upper() for m in operations} | {"OPTIONS"}
        methods |= {"HEAD"} if "GET" in methods else set()
        path = template.replace("{item_id}", "1")
        assert client.options(path).headers["allow"] == ", ".join(sorted(methods)), template


def test_options_needs_no_key(keyed: TestClient) -> None:
    assert keyed.get("/gallery").status_code == 401
    assert keyed.options("/gallery").status_code == 204


@pytest.mark.parametrize("path", ["/gallery/labels", "/gallery/abc", "/gallery/-1/image"])
def test_a_segment_that_is_not_digits_is_not_an_id(client: TestClient, path: str) -> None:
    assert client.delete(path).status_code in (404, 405)
    assert "DELETE" not in client.options(path).headers.get("allow", "")
    assert client.post(path.replace("/gallery", "/search/by-id")).status_code == 404


def test_a_huge_id_is_refused_not_parsed(client: TestClient) -> None:
    response = client.get("/gallery/" + "9" * 5000)  # int() of it would raise while routing
    assert response.status_code == 422
    assert client.get(f"/gallery/{MAX_ID + 1}").status_code == 422


def test_metrics_count_head_and_options_by_route_template(client: TestClient) -> None:
    client.head("/gallery/3")
    client.options("/gallery/3")
    text = client.get("/metrics").text
    assert 'method="HEAD",route="/gallery/{item_id}",status="200"' in text
    assert 'method="OPTIONS",route="/gallery/{item_id}",status="204"' in text


def test_a_malformed_form_is_400_as_documented(client: TestClient) -> None:
    response = client.post(
        "/search",
        content=b"--b\r\n[]--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
    forms = _operations_with_forms(client.get("/openapi.json").json())
    assert len(forms) == 5
    assert all("400" in operation["responses"] for operation in forms.values())


def test_form_fields_are_documented_as_they_are_sent(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    bodies = schema["components"]["schemas"]
    explain = bodies["Body_explain_post_explain_post"]["properties"]
    assert all("anyOf" not in field for field in explain.values())  # a form has no null
    assert explain["a_id"]["maximum"] == MAX_ID
    assert explain["a_id"]["minimum"] == 0
    assert bodies["Body_search_batch_search_batch_post"]["properties"]["images"]["minItems"] == 1
    form = _operations_with_forms(schema)["POST /explain"]["requestBody"]["content"]
    assert form["multipart/form-data"]["encoding"] == {
        "a": {"contentType": "image/*"},
        "b": {"contentType": "image/*"},
    }
    # What the schema says is refused is refused: an id past MAX_ID, a null.
    beyond = client.post("/explain", data={"a_id": str(MAX_ID + 1), "b_id": "1"})
    assert beyond.status_code == 422
    assert client.post("/explain", data={"a_id": "null", "b_id": "1"}).status_code == 422


def test_metrics_documents_its_refusals(keyed: TestClient) -> None:
    responses = keyed.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]
    assert {"200", "401", "403"} <= responses.keys()
    assert "text/plain" in responses["200"]["content"]
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 403
    scraped = keyed.get("/metrics", headers={"Authorization": f"Bearer {READ}"})
    assert scraped.headers["content-type"].startswith("text/plain")


def test_the_schema_says_which_operations_need_a_key(
    client: TestClient, served: dict[str, Path], fresh_index: Path
) -> None:
    assert "securitySchemes" not in client.get("/openapi.json").json()["components"]
    settings = settings_for(served, fresh_index, read_keys=["r"], write_keys=["w"])
    schema = create_app(settings).openapi()
    needs_key = {
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if operation.get("security")
    }
    assert {"POST /search", "GET /gallery/{item_id}", "DELETE /gallery/{item_id}"} <= needs_key
    assert not {"GET /healthz", "GET /readyz", "GET /metrics"} & needs_key  # metrics: open
    assert schema["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"


def _operations_with_forms(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": operation
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "multipart/form-data" in operation.get("requestBody", {}).get("content", {})
    }
