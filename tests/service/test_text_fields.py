"""Text a request carries is valid UTF-8 (or valid in the charset its form declares), else 422
naming the field: Starlette would read it as Latin-1 (forms) or U+FFFD (query strings)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.text import bad_query_text
from tests.service.conftest import png, settings_for

BOUNDARY = "diml-test-boundary"


def _form(*parts: tuple[bytes, bytes]) -> bytes:
    """A multipart body of (Content-Disposition parameters, content) parts."""
    body = b""
    for disposition, content in parts:
        body += f"--{BOUNDARY}\r\n".encode() + b"Content-Disposition: form-data; " + disposition
        body += b"\r\n\r\n" + content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def _post(
    client: TestClient, path: str, body: bytes, charset: str = ""
) -> tuple[int, dict[str, Any]]:
    content_type = f"multipart/form-data; boundary={BOUNDARY}{charset}"
    answer = client.post(path, content=body, headers={"content-type": content_type})
    return answer.status_code, answer.json()


IMAGE = (b'name="images"; filename="a.png"', png())


@pytest.fixture
def writable(served: dict[str, Path], fresh_index: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(served, fresh_index), load_in_background=False)) as c:
        yield c


@pytest.mark.parametrize("field", ["key", "label"])
def test_a_form_field_that_is_not_utf8_is_refused_naming_it(
    writable: TestClient, field: str
) -> None:
    """The finding: b'\\xff\\xfe' was stored as the Latin-1 text 'ÿþ'."""
    status, body = _post(
        writable, "/gallery", _form(IMAGE, (f'name="{field}"'.encode(), b"\xff\xfe"))
    )
    assert status == 422, body
    assert body["error"]["code"] == "invalid_request"
    assert f"'{field}'" in body["error"]["message"]
    assert writable.get("/gallery").json()["total"] == 12  # nothing added


def test_utf8_text_and_a_declared_charset_are_read_as_sent(writable: TestClient) -> None:
    status, body = _post(writable, "/gallery", _form(IMAGE, (b'name="label"', "café".encode())))
    assert status == 201, body
    assert body["added"][0]["label"] == "café"
    other = (b'name="images"; filename="b.png"', png(Image.new("RGB", (64, 64), (10, 200, 10))))
    latin = _form(other, (b'name="label"', "thé".encode("latin-1")))
    status, body = _post(writable, "/gallery", latin, charset="; charset=latin-1")
    assert status == 201, body
    assert body["added"][0]["label"] == "thé"
    status, body = _post(writable, "/gallery", latin, charset="; charset=no-such-charset")
    assert status == 422
    assert "charset" in body["error"]["message"]


def test_a_file_name_that_is_not_utf8_is_refused(writable: TestClient) -> None:
    """Without a key, an upload's file name becomes its key."""
    status, body = _post(
        writable, "/gallery", _form((b'name="images"; filename="\xe9.png"', png()))
    )
    assert status == 422, body
    assert "file name" in body["error"]["message"]


def test_a_query_parameter_that_is_not_utf8_is_refused_naming_it(client: TestClient) -> None:
    """'%FF' became U+FFFD: a filter on a label nobody has, answered 200 with nothing."""
    refused = client.post("/search/by-id/0?label=%FF%FE&k=3")
    assert refused.status_code == 422
    assert "'label'" in refused.json()["error"]["message"]
    assert client.post("/search/by-id/0?label=caf%C3%A9&k=3").status_code == 200


def test_query_strings_are_checked_pair_by_pair() -> None:
    assert bad_query_text(b"") is None
    assert bad_query_text(b"label=caf%C3%A9&k=3&flag") is None
    assert bad_query_text(b"a=%C3") is not None  # a truncated sequence
    assert bad_query_text(b"label=caf\xc3\xa9") is not None  # not percent-encoded
    refusal = bad_query_text(b"k=3&%FFname=x")
    assert refusal is not None
    assert "'\ufffdname'" in refusal.message
