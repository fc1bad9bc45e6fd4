"""What an untrusted image may cost, and the checks that hold it to that before any pixel is
decoded: pixel count, aspect ratio, (for JPEG) whether the data can hold the declared pixels and
how many scans it takes, the files Pillow decodes in Python, and the memory a decode will hold.

Every limit on decoding is declared here, once: the index builder and the service both decode
through :mod:`model.decoding` with these defaults.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from PIL import Image, ImageFile
from PIL.JpegImagePlugin import JpegImageFile

from model.file_structure import MAX_PARSER_STEPS, jpeg_first_scan, parser_steps

# The one default of both limits, for the index builder and the service (its DIML_MAX_PIXELS and
# DIML_MAX_ASPECT_RATIO): whatever a build indexes, the service decodes again to explain it.
# 64 M takes the 48-50 megapixel photos of today's phone cameras; what decoding may hold in
# memory is bounded apart (JPEG decodes reduced; the service's decoding budget counts the rest).
DEFAULT_MAX_PIXELS = 64_000_000
# Longer side / shorter side: a panorama of 20:1 is still an image the model's centre crop can
# describe; a strip of 1 x 10,000 pixels is a way to make every step cost its long side.
DEFAULT_MAX_ASPECT = 20.0
# Every scan of a JPEG passes over all of its coefficients, so a small file of many tiny scans
# costs seconds of decoding per hundred (a 156 KB file of 2,000 scans at 4000 x 4000 took 17 s).
# Encoders write about 10 (libjpeg's and mozjpeg's progressive scripts); nvImageCodec refuses
# more than 256 by default for the same reason. Counted as start-of-scan markers in the file.
MAX_JPEG_SCANS = 100
# The text a PNG may carry (tEXt, zTXt, iTXt chunks, inflated), once
# :func:`~model.decoding.configure_decoders` ran: XMP from editing tools is tens of kilobytes,
# rarely a few megabytes.
MAX_PNG_TEXT_BYTES = 4 << 20
# Images that one of Pillow's decoders written in Python decodes (those registered in
# ``Image.DECODERS``; among the service's formats only BMP's RLE4 and RLE8). They loop in Python
# once per run-length command, and for RLE4 runs and the padding to the end of a row once per
# pixel, holding the interpreter lock: a 25 KB RLE8 BMP of 6000 x 6000 pixels (one pixel and an
# end-of-row each row) took 4.7 s, a 20 MB one of one-pixel runs 5.5 s, and 4 MB of runs 1.2 s
# (``bench/bench_hostile.py``). RLE bitmaps are icons, logos and screenshots: at most
# 2048 x 2048 pixels in 2 MB of file decode in about half a second whatever they hold.
MAX_PYTHON_DECODED_PIXELS = 2048 * 2048
MAX_PYTHON_DECODED_BYTES = 2 << 20


class ImageLoadError(ValueError):
    """An input could not be decoded into an image; the message names the input and the fix.

    ``reason`` is the message without the input's name; ``kind`` one of ``unreadable`` (no such
    file, a folder, no permission), ``not_image``, ``format`` (an image, but not of an allowed
    format), ``too_many_pixels``, ``aspect_ratio``, ``too_many_scans`` (a JPEG in more scans than
    :data:`MAX_JPEG_SCANS`), ``too_many_elements`` (a file of more parts than
    :data:`~model.file_structure.MAX_PARSER_STEPS`), ``metadata`` (more PNG text than
    :func:`~model.decoding.configure_decoders` allows) and ``corrupt`` (truncated or damaged data).
    """

    def __init__(self, name: str, reason: str, kind: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason
        self.kind = kind


def check_structure(data: bytes, name: str) -> None:
    """Refuse a file made of more elements than Pillow's opener should walk
    (:mod:`model.file_structure`), before it is opened."""
    fmt, what, steps = parser_steps(data)
    if steps > MAX_PARSER_STEPS:
        raise ImageLoadError(
            name,
            f"a {fmt} of more than {MAX_PARSER_STEPS:,} {what} (each is parsed on its own; "
            "encoders write a few hundred); save it again with a common encoder",
            "too_many_elements",
        )


def _check_python_decoded(image: Image.Image, name: str, data: bytes | None, codecs: str) -> None:
    """Refuse an image that a decoder written in Python would take seconds over
    (:data:`MAX_PYTHON_DECODED_PIXELS`, :data:`MAX_PYTHON_DECODED_BYTES`)."""
    width, height = image.size
    why = f"Pillow decodes this {image.format} ({codecs}) step by step in Python"
    if width * height > MAX_PYTHON_DECODED_PIXELS:
        raise ImageLoadError(
            name,
            f"{width}x{height} is {width * height:,} pixels, over the limit of "
            f"{MAX_PYTHON_DECODED_PIXELS:,} for this file: {why}; save it as PNG or "
            "uncompressed, or downscale it",
            "too_many_pixels",
        )
    if data is not None and len(data) > MAX_PYTHON_DECODED_BYTES:
        raise ImageLoadError(
            name,
            f"{len(data):,} bytes, over the limit of {MAX_PYTHON_DECODED_BYTES:,} for this "
            f"file: {why}, one command at a time; save it as PNG or uncompressed",
            "too_many_elements",
        )


def check_header(
    image: Image.Image,
    name: str,
    data: bytes | None,
    several_scans: bool,
    max_pixels: int,
    formats: Collection[str] | None,
    max_aspect: float | None,
) -> None:
    """What the header and the file's bytes tell before decoding: format, pixel count, aspect
    ratio, data too short to hold the pixels it declares, a JPEG's number of scans."""
    if formats is not None and image.format not in formats:
        raise ImageLoadError(
            name,
            f"{image.format} images are not accepted; use {', '.join(sorted(formats))}",
            "format",
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(name, f"declares an empty {width}x{height} image", "corrupt")
    if width * height > max_pixels:
        raise ImageLoadError(
            name,
            f"{width}x{height} is {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; downscale the image first",
            "too_many_pixels",
        )
    tiles = image.tile if isinstance(image, ImageFile.ImageFile) else []
    in_python = sorted({tile[0] for tile in tiles if tile[0] in Image.DECODERS})
    if in_python:
        _check_python_decoded(image, name, data, ", ".join(in_python))
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise ImageLoadError(
            name,
            f"{width}x{height} is more than {max_aspect:g} times as long as it is wide; "
            "crop the image to the subject first",
            "aspect_ratio",
        )
    # Huffman-coded JPEG spends at least one bit on every 8 x 8 block it holds (a DC code and an
    # end-of-block code per block, several blocks per 8 x 8 pixels in colour): a file with fewer
    # bytes than one bit per 64 pixels declares pixels it does not carry. libjpeg would fill them
    # with grey and call the image good.
    if data is None or not isinstance(image, JpegImageFile):  # JPEG and MPO from here
        return
    if len(data) * 512 < width * height:
        raise ImageLoadError(
            name,
            f"truncated: {len(data):,} bytes cannot hold the {width}x{height} pixels the "
            "header declares",
            "corrupt",
        )
    # A JPEG in one scan holding every component is decoded in that one scan (libjpeg stops at
    # a second); only the others are counted.
    scans = data.count(b"\xff\xda") if several_scans else 1
    if scans > MAX_JPEG_SCANS:
        raise ImageLoadError(
            name,
            f"a JPEG in {scans:,} scans (the limit is {MAX_JPEG_SCANS}: each scan is decoded over "
            "the whole image); save it again as a baseline or standard progressive JPEG",
            "too_many_scans",
        )


def decoded_bytes(image: Image.Image) -> int:
    """The memory that decoding ``image`` (opened, not yet loaded, after any ``draft``) holds,
    from its header: Pillow keeps 1 byte per pixel for 1/L/P, 2 for 16-bit, 4 for every other
    mode. WebP holds four times that (measured with Pillow 13): it goes through libwebp's
    animation decoder, whose two canvases, the frame it hands over and Pillow's copy are 4 bytes
    per pixel each. A JPEG sent in several scans (:func:`jpeg_scans_separately`) holds more:
    :func:`jpeg_coefficient_bytes`."""
    width, height = image.size
    if image.format == "WEBP":
        return width * height * 16
    mode = image.mode
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * per_pixel


def metadata_bytes(image: Image.Image) -> int:
    """The metadata an opened image already holds (inflated PNG text, EXIF, ICC profile...):
    it stays in memory for as long as the decode does."""
    return sum(len(v) for v in image.info.values() if isinstance(v, str | bytes))


def jpeg_coefficient_bytes(image: JpegImageFile) -> int:
    """What libjpeg holds beside the picture when a JPEG (opened, before any ``draft``) arrives
    in several scans: every DCT coefficient of the full-size image, however small the scale it
    is decoded at. Per component, its 8 x 8 blocks at its sampling, rounded up to whole
    sampling units, 64 coefficients of 2 bytes."""
    h_max = max(layer[1] for layer in image.layer)
    v_max = max(layer[2] for layer in image.layer)
    total = 0
    for _, h, v, _ in image.layer:
        columns = math.ceil(math.ceil(image.width * h / h_max) / 8)
        rows = math.ceil(math.ceil(image.height * v / v_max) / 8)
        total += math.ceil(columns / h) * h * math.ceil(rows / v) * v * 128
    return total


def jpeg_scans_separately(image: Image.Image, data: bytes | None) -> bool:
    """Whether ``image`` is a JPEG that libjpeg decodes in several scans, buffering every
    coefficient: progressive, or its first scan leaves out some of its components (``data``,
    the file's bytes, None: unknown, so assume so). False for other formats."""
    if not isinstance(image, JpegImageFile):
        return False
    if image.info.get("progressive") or image.info.get("progression") or data is None:
        return True
    _, scan = jpeg_first_scan(data)
    if scan is None or scan + 4 >= len(data):
        return True
    return data[scan + 4] < len(image.layer)  # after the marker and its length: the components
