"""Image decoding and test-time preprocessing, with the geometry that maps parts back to pixels.

Every image, whatever its file format or mode, becomes an upright RGB picture: EXIF orientation is
applied; palette, grayscale, CMYK, 16-bit and 32-bit float images are converted; transparency is
composited on white. :func:`preprocess` then resizes and centre-crops as the model's
:class:`~model.config.Preprocessing` says, and returns the :class:`ImageGeometry` that tells where
each grid cell lies in the original image.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.config import Preprocessing

DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = str | os.PathLike[str] | bytes | Image.Image


class ImageLoadError(ValueError):
    """An input could not be decoded into an image; the message names the input and the fix.

    ``reason`` is the message without the input's name; ``kind`` one of ``unreadable`` (no such
    file, a folder, no permission), ``not_image``, ``format`` (an image, but not of an allowed
    format), ``too_many_pixels`` and ``corrupt`` (truncated or damaged data).
    """

    def __init__(self, name: str, reason: str, kind: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason
        self.kind = kind


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
) -> Image.Image:
    """Decode ``source`` (a path, raw bytes or a PIL image) into an upright RGB image.

    Raises :class:`ImageLoadError` naming the input when it is missing, not an image, not one of
    ``formats`` (PIL format names, e.g. ``{"JPEG", "PNG"}``; None allows all), truncated, or has
    more than ``max_pixels`` pixels (checked from the header, before decoding). A multi-frame
    image (GIF, TIFF) gives its first frame.
    """
    name = _describe(source)
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            # Only the accepted formats' decoders are tried: Pillow's other plugins (DDS, EPS,
            # JPEG 2000, FITS...) never see untrusted bytes.
            tried = _openers(formats)
            image = Image.open(io.BytesIO(data), formats=tried)
        if formats is not None and image.format not in formats:
            raise ImageLoadError(
                name,
                f"{image.format} images are not accepted; use {', '.join(sorted(formats))}",
                "format",
            )
        width, height = image.size
        if width * height > max_pixels:
            raise ImageLoadError(
                name,
                f"{width}x{height} is {width * height:,} pixels, over the limit of "
                f"{max_pixels:,}; downscale the image first",
                "too_many_pixels",
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
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
    except (
        OSError,
        SyntaxError,
        ValueError,
        NotImplementedError,
        Image.DecompressionBombWarning,
    ) as e:
        raise ImageLoadError(name, f"corrupt or truncated image data ({e})", "corrupt") from e


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
    """16-bit and 32-bit integer or float grayscale to 8-bit RGB, keeping relative intensities."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        scaled = values / (65535.0 if values.max(initial=0) > 255 else 255.0)
    gray = np.clip(np.nan_to_num(scaled) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def preprocess(image: Image.Image, spec: Preprocessing) -> tuple[torch.Tensor, ImageGeometry]:
    """Resize the shorter side to ``spec.resize``, centre-crop ``spec.crop``, normalise.

    image: RGB, any size -> pixels: (3, crop, crop) float32, geometry in original pixels.
    """
    if image.mode != "RGB":
        image = to_rgb(image)
    (new_w, new_h), (left, top) = _resize_and_crop(image.width, image.height, spec)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    crop = resized.crop((left, top, left + spec.crop, top + spec.crop))
    array = np.asarray(crop, dtype=np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    pixels = torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())
    return pixels, geometry_of(image.width, image.height, spec)


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
