"""Test-time preprocessing: an RGB picture -> the model's normalised pixels, with the geometry
that maps its grid cells back to the original's pixels; and :func:`load_for_model`, which decodes
(:mod:`model.decoding`) only what the preprocessing needs.

:func:`preprocess` resizes and centre-crops as the model's :class:`~model.config.Preprocessing`
says, and returns the :class:`ImageGeometry` that tells where each grid cell lies in the original.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model.config import Preprocessing
from model.decoding import ImageSource, Reserve, decode_picture, to_rgb
from model.image_limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS

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

    Checks as :func:`~model.decoding.load_image` (with an aspect-ratio limit by default), then
    decodes reduced: JPEG through its DCT scaling (``draft``), other formats reduced by an
    integer factor right after decoding, so that the shorter side stays at least
    ``spec.resize``; the crop is cut before it is resized. ``reserve(n)``, when given, is entered
    with the bytes the decode will hold before any pixel is decoded (the service bounds
    concurrent decoding memory with it).
    """
    picture, size = decode_picture(source, max_pixels, formats, max_aspect, spec.resize, reserve)
    pixels, geometry = preprocess(picture, spec, original_size=size)
    return ModelInput(pixels, geometry, picture)


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
