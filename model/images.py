"""The former home of image decoding and preprocessing, now apart: bounded, hostile-safe
decoding in :mod:`model.decoding` (its limits and checks in :mod:`model.image_limits`), the
model's preprocessing in :mod:`model.preprocessing`. The old names stay importable from here
for code not yet moved over; new code imports from those modules."""

from model.decoding import ImageSource, Reserve, configure_decoders, load_image, to_rgb
from model.image_limits import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    MAX_JPEG_SCANS,
    MAX_PNG_TEXT_BYTES,
    MAX_PYTHON_DECODED_BYTES,
    MAX_PYTHON_DECODED_PIXELS,
    ImageLoadError,
    decoded_bytes,
    jpeg_coefficient_bytes,
    jpeg_scans_separately,
    metadata_bytes,
)
from model.preprocessing import (
    GEOMETRY_COLUMNS,
    ImageGeometry,
    ModelInput,
    geometry_of,
    load_for_model,
    preprocess,
)

__all__ = [
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MAX_PIXELS",
    "GEOMETRY_COLUMNS",
    "MAX_JPEG_SCANS",
    "MAX_PNG_TEXT_BYTES",
    "MAX_PYTHON_DECODED_BYTES",
    "MAX_PYTHON_DECODED_PIXELS",
    "ImageGeometry",
    "ImageLoadError",
    "ImageSource",
    "ModelInput",
    "Reserve",
    "configure_decoders",
    "decoded_bytes",
    "geometry_of",
    "jpeg_coefficient_bytes",
    "jpeg_scans_separately",
    "load_for_model",
    "load_image",
    "metadata_bytes",
    "preprocess",
    "to_rgb",
]
