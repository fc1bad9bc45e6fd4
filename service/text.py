"""Text that a request carries is valid in its encoding (UTF-8 unless a form declares another
charset), or the request is refused with 422 naming the field.

Starlette decodes what is not valid anyway: a multipart text field (or a part's name or file
name) falls back to Latin-1, and percent-encoded bytes of a query string that are not UTF-8
become U+FFFD. Either way a key or label would be stored, or a filter matched, as text the
client never sent. Only the raw bytes tell, and they are seen only on their way in: this
middleware parses the form a second time as it streams (python-multipart, a few milliseconds
for 20 MB), keeping only the text parts' decoders, never the data.
"""

from __future__ import annotations

import codecs
from urllib.parse import unquote_to_bytes

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.limits import RefusedError, call_refusing, refuse

SHOWN = 64  # characters of a bad field's name quoted in the error


def bad_query_text(query: bytes) -> RefusedError | None:
    """The refusal for a query string with a parameter (name or value) that is not UTF-8 once
    percent-decoded, or that holds bytes outside ASCII not percent-encoded; else None."""
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        for raw in (name, value):
            try:
                if not raw.isascii():
                    raise UnicodeError
                unquote_to_bytes(raw).decode("utf-8")
            except UnicodeError:
                shown = unquote_to_bytes(name).decode("utf-8", "replace")[:SHOWN]
                return _refusal(f"the query parameter '{shown}' is not UTF-8 text: send it "
                                "percent-encoded in UTF-8")  # fmt: skip
    return None


class FormText:
    """Checks a multipart body as it streams: every text part's name and content, and every
    file part's name and file name, must decode in ``charset``. :meth:`write` raises
    :class:`RefusedError` naming the first that does not; a body python-multipart cannot
    parse is left to the app's own parser to refuse."""

    def __init__(self, boundary: bytes, charset: str) -> None:
        self.charset = charset
        self.parser: MultipartParser | None = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data,
            "on_part_end": self._end, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        })  # fmt: skip
        self.refusal: RefusedError | None = None
        self._begin()

    def write(self, chunk: bytes) -> None:
        if self.parser is None:
            return
        try:
            self.parser.write(chunk)
        except FormParserError:
            self.parser = None  # malformed: the app's parser answers 400
        if self.refusal is not None:
            raise self.refusal

    def _begin(self) -> None:
        self.header, self.value, self.disposition = b"", b"", b""
        self.name = ""
        self.text: codecs.IncrementalDecoder | None = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        raw_name = options.get(b"name", b"")
        if (name := self._decoded(raw_name)) is None:
            shown = raw_name.decode(self.charset, "replace")[:SHOWN]
            self._refuse(f"the name of the form field '{shown}' is not {self.charset} text")
            return
        self.name = name
        if b"filename" not in options:
            self.text = codecs.getincrementaldecoder(self.charset)()
        elif self._decoded(options[b"filename"]) is None:
            self._refuse(f"the file name sent in the form field '{name[:SHOWN]}' is not "
                         f"{self.charset} text")  # fmt: skip

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.text is not None and self.refusal is None:
            try:
                self.text.decode(data[start:end])
            except UnicodeError:
                self._refuse(f"the form field '{self.name[:SHOWN]}' is not {self.charset} text")

    def _end(self) -> None:
        if self.text is not None and self.refusal is None:
            try:
                self.text.decode(b"", final=True)
            except UnicodeError:
                self._refuse(f"the form field '{self.name[:SHOWN]}' is not {self.charset} text")
        self._begin()

    def _decoded(self, raw: bytes) -> str | None:
        try:
            return raw.decode(self.charset)
        except UnicodeError:
            return None

    def _refuse(self, message: str) -> None:
        if self.refusal is None:
            self.refusal = _refusal(f"{message}; send text fields in UTF-8")


def _refusal(message: str) -> RefusedError:
    return RefusedError(422, "invalid_request", message)


class TextIsValid:
    """ASGI middleware: refuses (422 ``invalid_request``, naming the field, connection closed)
    a request whose query string or multipart text is not valid text; see the module's
    docstring. A form in a charset Python does not know is refused too (Starlette would read
    it as Latin-1)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (refusal := bad_query_text(scope.get("query_string", b""))) is not None:
            await refuse(scope, send, refusal)
            return
        headers = dict(scope.get("headers") or [])
        content_type, params = parse_options_header(headers.get(b"content-type", b""))
        if content_type != b"multipart/form-data" or not params.get(b"boundary"):
            await self.app(scope, receive, send)
            return
        declared = params.get(b"charset", b"utf-8").decode("latin-1")
        try:
            charset = codecs.lookup(declared).name
        except LookupError:
            await refuse(scope, send, _refusal(f"the form's charset '{declared[:SHOWN]}' is "
                                               "unknown; send the form in UTF-8"))  # fmt: skip
            return
        form = FormText(params[b"boundary"], charset)

        async def checked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                form.write(message.get("body", b""))
            return message

        await call_refusing(self.app, scope, checked_receive, send)
