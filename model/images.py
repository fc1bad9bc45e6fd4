"""Image decoding and test-time preprocessing, with the geometry that maps parts back to pixels.

Every image, whatever its file format or mode, becomes an upright RGB picture: EXIF orientation is
applied; palette, grayscale, CMYK, 16-bit and 32-bit float images are converted; transparency is
composited on white. :func:`preprocess` then resizes and centre-crops as the model's
:class:`~model.config.Preprocessing` says, and returns the :class:`ImageGeometry` that tells where
each grid cell lies in the original image.

Untrusted files cost what the model needs, not what they declare: only the accepted formats'
decoders run; pixel count, aspect ratio and (for JPEG) whether the data can hold the declared
pixels are checked from the header; :func:`load_for_model` decodes reduced and cuts the crop
before resizing it. Truncated files are refused (``corrupt``), never padded.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from model.config import Preprocessing
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
# The text a PNG may carry (tEXt, zTXt, iTXt chunks, inflated), once :func:`configure_decoders`
# ran: XMP from editing tools is tens of kilobytes, rarely a few megabytes.
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

ImageSource = str | os.PathLike[str] | bytes | Image.Image
Reserve = Callable[[int], AbstractContextManager[object]]


class ImageLoadError(ValueError):
    """An input could not be decoded into an image; the message names the input and the fix.

    ``reason`` is the message without the input's name; ``kind`` one of ``unreadable`` (no such
    file, a folder, no permission), ``not_image``, ``format`` (an image, but not of an allowed
    format), ``too_many_pixels``, ``aspect_ratio``, ``too_many_scans`` (a JPEG in more scans than
    :data:`MAX_JPEG_SCANS`), ``too_many_elements`` (a file of more parts than
    :data:`~model.file_structure.MAX_PARSER_STEPS`), ``metadata`` (more PNG text than
    :func:`configure_decoders` allows) and ``corrupt`` (truncated or damaged data).
    """

    def __init__(self, name: str, reason: str, kind: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason
        self.kind = kind


GEOMETRY_COLUMNS = ("width", "height", "left", "top", "size")  # a geometry row's columns


@dataclass(frozen=True)
class ImageGeometry:
    """Where the model's centre crop lies in the original image (original pixel units).

    The crop is the square ``(left, top, left + size, top + size)`` of the original image; the
    model sees it resized to ``Preprocessing.crop`` pixels.
    """

    width: int
    height: int
    left: float
    top: float
    size: float

    def row(self) -> torch.Tensor:
        """The geometry as one row of a batched (N, 5) tensor: :data:`GEOMETRY_COLUMNS`."""
        return torch.tensor([float(getattr(self, name)) for name in GEOMETRY_COLUMNS])

    def cell_boxes(self, grid: int) -> list[tuple[float, float, float, float]]:
        """Pixel boxes ``(x0, y0, x1, y1)`` of the ``grid x grid`` cells, row-major (R of them).

        Cell ``r`` is row ``r // grid``, column ``r % grid``: the order of the model's part vectors.
        """
        step = self.size / grid
        return [
            (
                self.left + col * step,
                self.top + row * step,
                self.left + (col + 1) * step,
                self.top + (row + 1) * step,
            )
            for row in range(grid)
            for col in range(grid)
        ]


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
    frame. :func:`load_for_model` decodes only what the model needs.
    """
    image, _ = _decode(source, max_pixels, formats, max_aspect, None, None)
    return image


@dataclass(frozen=True)
class ModelInput:
    """A decoded image as the model takes it: normalised ``pixels`` (3, crop, crop), the
    ``geometry`` of the crop in the original's pixels, and ``picture``, the upright RGB image
    reduced to about the size the model looks at (for drawing explanations)."""

    pixels: torch.Tensor
    geometry: ImageGeometry
    picture: Image.Image


def load_for_model(
    source: ImageSource,
    spec: Preprocessing,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Collection[str] | None = None,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    reserve: Reserve | None = None,
) -> ModelInput:
    """Decode ``source`` at the cost of what the model needs, not of what the file declares.

    Checks as :func:`load_image` (with an aspect-ratio limit by default), then decodes reduced:
    JPEG through its DCT scaling (``draft``), other formats reduced by an integer factor right
    after decoding, so that the shorter side stays at least ``spec.resize``; the crop is cut
    before it is resized. ``reserve(n)``, when given, is entered with the bytes the decode will
    hold before any pixel is decoded (the service bounds concurrent decoding memory with it).
    """
    picture, size = _decode(source, max_pixels, formats, max_aspect, spec.resize, reserve)
    pixels, geometry = preprocess(picture, spec, original_size=size)
    return ModelInput(pixels, geometry, picture)


def _decode(
    source: ImageSource,
    max_pixels: int,
    formats: Collection[str] | None,
    max_aspect: float | None,
    reduce_to: int | None,
    reserve: Reserve | None,
) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB picture (reduced so its shorter side stays >= ``reduce_to`` when given)
    and the original's upright size."""
    name = _describe(source)
    with _load_errors(name, max_pixels, formats):
        data: bytes | None = None
        if isinstance(source, Image.Image):
            image = source
        else:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            _check_structure(data, name)
            # Only the accepted formats' decoders are tried: Pillow's other plugins (DDS, EPS,
            # JPEG 2000, FITS...) never see untrusted bytes.
            image = Image.open(io.BytesIO(data), formats=_openers(formats))
        several_scans = jpeg_scans_separately(image, data)
        _check_header(image, name, data, several_scans, max_pixels, formats, max_aspect)
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
      large image is the ``max_pixels`` limit of :func:`load_for_model`, read from the header.

    Process-wide because Pillow's limits are module globals and Python's warning filters are
    global (``warnings.catch_warnings`` around each decode would race between threads).
    """
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES
    PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, MAX_PNG_TEXT_BYTES)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.")


def _check_structure(data: bytes, name: str) -> None:
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


def _check_header(
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

    Works in float32 on the image as given: callers reduce it first (:func:`load_for_model`).
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


def preprocess(
    image: Image.Image, spec: Preprocessing, original_size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, ImageGeometry]:
    """Resize the shorter side to ``spec.resize``, centre-crop ``spec.crop``, normalise.

    image: RGB, any size -> pixels: (3, crop, crop) float32, geometry in original pixels.
    ``original_size`` (width, height): the image ``image`` was reduced from, when it was. The
    crop is cut from the image and resized in one step, so the cost follows the crop, not the
    image's aspect ratio.
    """
    if image.mode != "RGB":
        image = to_rgb(image)
    width, height = original_size or image.size
    geometry = geometry_of(width, height, spec)
    sx, sy = image.width / width, image.height / height
    box = (
        geometry.left * sx,
        geometry.top * sy,
        (geometry.left + geometry.size) * sx,
        (geometry.top + geometry.size) * sy,
    )
    crop = image.resize((spec.crop, spec.crop), Image.Resampling.BILINEAR, box=box)
    array = np.asarray(crop, dtype=np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    pixels = torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())
    return pixels, geometry


def geometry_of(width: int, height: int, spec: Preprocessing) -> ImageGeometry:
    """Where :func:`preprocess` puts its crop in a ``width x height`` image."""
    (new_w, new_h), (left, top) = _resize_and_crop(width, height, spec)
    sx, sy = width / new_w, height / new_h
    return ImageGeometry(
        width=width, height=height, left=left * sx, top=top * sy, size=spec.crop * min(sx, sy)
    )


def _resize_and_crop(
    width: int, height: int, spec: Preprocessing
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The resized size (shorter side ``spec.resize``) and the centre crop's top-left corner."""
    scale = spec.resize / min(width, height)
    new_w, new_h = max(spec.crop, round(width * scale)), max(spec.crop, round(height * scale))
    return (new_w, new_h), ((new_w - spec.crop) // 2, (new_h - spec.crop) // 2)


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return "image"
    if isinstance(source, bytes):
        return f"uploaded data ({len(source):,} bytes)"
    return str(source)
