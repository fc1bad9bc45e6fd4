"""Bounded, hostile-safe decoding: bytes, a path or a PIL image -> an upright RGB picture.

Every image, whatever its file format or mode, becomes an upright RGB picture: EXIF orientation is
applied; palette, grayscale, CMYK, 16-bit and 32-bit float images are converted; transparency is
composited on white.

Untrusted files cost what the caller needs, not what they declare: only the accepted formats'
decoders run; the limits of :mod:`model.image_limits` are checked from the header and the file's
bytes before decoding; :func:`decode_picture` can decode reduced (JPEG through its DCT scaling).
Truncated files are refused (``corrupt``), never padded. Preprocessing for the model is apart, in
:mod:`model.preprocessing`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from model.image_limits import (
    DEFAULT_MAX_PIXELS,
    MAX_PNG_TEXT_BYTES,
    ImageLoadError,
    check_header,
    check_structure,
    decoded_bytes,
    jpeg_coefficient_bytes,
    jpeg_scans_separately,
    metadata_bytes,
)

ImageSource = str | os.PathLike[str] | bytes | Image.Image
Reserve = Callable[[int], AbstractContextManager[object]]


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Collection[str] | None = None,
    max_aspect: float | None = None,
) -> Image.Image:
    """Decode ``source`` (a path, raw bytes or a PIL image) into an upright RGB image, full size.

    Raises :class:`ImageLoadError` naming the input when it is missing, not an image, not one of
    ``formats`` (PIL format names, e.g. ``{"JPEG", "PNG"}``; None allows all), truncated, has
    more than ``max_pixels`` pixels or a longer side over ``max_aspect`` times the shorter (both
    checked from the header, before decoding). A multi-frame image (GIF, TIFF) gives its first
    frame. :func:`model.preprocessing.load_for_model` decodes only what the model needs.
    """
    image, _ = decode_picture(source, max_pixels, formats, max_aspect, None, None)
    return image


def decode_picture(
    source: ImageSource,
    max_pixels: int,
    formats: Collection[str] | None,
    max_aspect: float | None,
    reduce_to: int | None,
    reserve: Reserve | None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``source`` as :func:`load_image` does -> (the upright RGB picture, the original's
    upright (width, height)). ``reduce_to``: decode reduced, so that the picture's shorter side
    stays >= it (None: full size); ``reserve(n)``, when given, is entered with the bytes the
    decode will hold before any pixel is decoded, and held until the decode is done."""
    name = _describe(source)
    with _load_errors(name, max_pixels, formats):
        data: bytes | None = None
        if isinstance(source, Image.Image):
            image = source
        else:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            check_structure(data, name)
            # Only the accepted formats' decoders are tried: Pillow's other plugins (DDS, EPS,
            # JPEG 2000, FITS...) never see untrusted bytes.
            image = Image.open(io.BytesIO(data), formats=_openers(formats))
        several_scans = jpeg_scans_separately(image, data)
        check_header(image, name, data, several_scans, max_pixels, formats, max_aspect)
        width, height = image.size
        coefficients = 0
        if several_scans and isinstance(image, JpegImageFile):
            coefficients = jpeg_coefficient_bytes(image)
        if reduce_to is not None and isinstance(image, JpegImageFile):  # JPEG and MPO
            scale = reduce_to / min(width, height)
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        cost = decoded_bytes(image) + coefficients + metadata_bytes(image)
    # The reservation's own errors (a budget exhausted, a deadline passed) are the caller's:
    # they pass through unmapped.
    held = reserve(cost) if reserve else contextlib.nullcontext()
    with held, _load_errors(name, max_pixels, formats):  # entered in this order, left reversed
        image.load()
        if reduce_to is not None:
            image = _reduce(image, reduce_to)
        upright = ImageOps.exif_transpose(image)
        if upright.size != image.size:  # turned by 90 degrees
            width, height = height, width
        return to_rgb(upright), (width, height)


@contextlib.contextmanager
def _load_errors(name: str, max_pixels: int, formats: Collection[str] | None) -> Iterator[None]:
    """Whatever reading or decoding ``name`` raises, as an :class:`ImageLoadError` of its kind.

    Pillow's plugins parse untrusted bytes in Python, and a malformed file can make them fail in
    any way (a TIFF whose XMP tag holds numbers instead of bytes raised a TypeError from a regular
    expression); any exception but running out of memory is the file's fault, ``corrupt``.
    """
    try:
        yield
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(name, "no such file; check the path", "unreadable") from e
    except IsADirectoryError as e:
        raise ImageLoadError(name, "is a folder, not an image file", "unreadable") from e
    except PermissionError as e:
        raise ImageLoadError(name, "permission denied; make the file readable", "unreadable") from e
    except Image.DecompressionBombError as e:  # the header alone declares far too many pixels
        raise ImageLoadError(
            name,
            f"declares too many pixels ({e}); the limit is {max_pixels:,}: downscale the image",
            "too_many_pixels",
        ) from e
    except UnidentifiedImageError as e:
        accepted = ", ".join(sorted(formats)) if formats else "JPEG, PNG, WebP, GIF, BMP or TIFF"
        raise ImageLoadError(name, f"not a readable image; use {accepted}", "not_image") from e
    except MemoryError:
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        NotImplementedError,
        Image.DecompressionBombWarning,
    ) as e:
        if "MAX_TEXT" in str(e):  # PngImagePlugin's limits on text chunks
            raise ImageLoadError(
                name,
                "holds more text metadata than accepted (at most "
                f"{PngImagePlugin.MAX_TEXT_CHUNK:,} bytes a chunk and "
                f"{PngImagePlugin.MAX_TEXT_MEMORY:,} in all); save the image without its metadata",
                "metadata",
            ) from e
        raise ImageLoadError(name, f"corrupt or truncated image data ({e})", "corrupt") from e
    except Exception as e:  # a malformed file can break a plugin anywhere
        raise ImageLoadError(
            name, f"corrupt image data (the decoder failed: {type(e).__name__})", "corrupt"
        ) from e


def configure_decoders() -> None:
    """Pillow's process-wide settings for untrusted files; the entry points that decode them
    call this once (the service at start-up, the ``diml`` command line).

    - PNG text chunks may hold :data:`MAX_PNG_TEXT_BYTES` in all (Pillow's default is 64 MB).
      They are zlib-compressed and Pillow inflates them while it opens the file, before any
      decoding budget can count them: a 67 KB PNG held 67 MB from its text alone. More is
      refused (``metadata``).
    - Pillow's warnings about malformed files stay out of the output. It warns once per damaged
      metadata entry ("Tag data larger than file. Skipping tag N"), and the entry numbers make
      each text new, so Python prints every one: a 48 KB JPEG whose EXIF lists 4,000 such tags
      wrote 790 KB to the log and took twice as long to decode. They describe the uploader's
      file, not a fault here (the decode goes on without the entry; an unreadable image is
      refused as ``corrupt``). The decompression-bomb warning is silenced too: what refuses a
      large image is the ``max_pixels`` limit of
      :func:`~model.preprocessing.load_for_model`, read from the header.

    Process-wide because Pillow's limits are module globals and Python's warning filters are
    global (``warnings.catch_warnings`` around each decode would race between threads).
    """
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES
    PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, MAX_PNG_TEXT_BYTES)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.")


def _reduce(image: Image.Image, short_side: int) -> Image.Image:
    """Shrink by the largest integer factor that keeps the shorter side >= ``short_side``
    (box averaging; palette and bilevel images by sampling)."""
    factor = min(image.size) // short_side
    if factor < 2:
        return image
    size = (math.ceil(image.width / factor), math.ceil(image.height / factor))
    return image.resize(size, Image.Resampling.BOX)


def _openers(formats: Collection[str] | None) -> list[str] | None:
    """The Pillow plugins that may open ``formats`` (MPO, for one, opens through JPEG's)."""
    if formats is None:
        return None
    Image.init()  # registers every plugin once; cheap afterwards
    return sorted(f for f in formats if f in Image.OPEN)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float grayscale to 8-bit RGB, keeping relative intensities.

    Works in float32 on the image as given: callers reduce it first
    (:func:`~model.preprocessing.load_for_model`).
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        scaled = values / (65535.0 if values.max(initial=0) > 255 else 255.0)
    gray = np.clip(np.nan_to_num(scaled) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return "image"
    if isinstance(source, bytes):
        return f"uploaded data ({len(source):,} bytes)"
    return str(source)
