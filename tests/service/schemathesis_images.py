"""Real images for schemathesis to upload where the OpenAPI schema says a form part is an image
(``encoding: contentType: image/*``), so that its positive cases are accepted requests.

In-process, :mod:`tests.service.test_openapi_fuzz` imports it; for the command line::

    SCHEMATHESIS_HOOKS=tests.service.schemathesis_images schemathesis run URL/openapi.json
"""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def _images(draw: st.DrawFn, fmt: str) -> bytes:
    """A small picture of two colours (within every default limit: pixels, aspect ratio)."""
    size = (draw(st.integers(8, 48)), draw(st.integers(8, 48)))
    colours = st.tuples(*[st.integers(0, 255)] * 3)
    image = Image.new("RGB", size, draw(colours))
    image.paste(draw(colours), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


schemathesis.openapi.media_type("image/png", _images("PNG"))
schemathesis.openapi.media_type("image/jpeg", _images("JPEG"))
