"""The decode stage: bytes -> pixels and geometry, within a shared memory budget and the
request's deadline."""

from __future__ import annotations

import functools
from pathlib import Path

from index_builder import Item
from model import ImageLoadError, ModelInput, load_for_model
from model.config import Preprocessing
from model.image_limits import DEFAULT_MAX_PIXELS
from service.failures import EmptyUploadError, NotFoundError, OverloadedError, UnusableImageError
from service.limits import BudgetExhaustedError, MemoryBudget, check_deadline
from service.settings import ALLOWED_FORMATS, Settings


class Decoder:
    """Decodes uploads and stored pictures for the model; ``budget`` bounds the memory that
    decodes in progress take together."""

    def __init__(self, settings: Settings, preprocessing: Preprocessing) -> None:
        self.settings, self.preprocessing = settings, preprocessing
        self.budget = MemoryBudget(settings.decode_memory_mb * 2**20)

    def upload(self, data: bytes, name: str = "image") -> ModelInput:
        """Bytes of an upload -> pixels and geometry. Raises EmptyUploadError or
        UnusableImageError when they are not a usable image (the message never includes a
        server path), OverloadedError when the decoding memory budget stays full, and
        DeadlineExceededError when the request's deadline passes before decoding could start."""
        if not data:
            raise EmptyUploadError(f"{name}: the upload is empty; send an image file")
        s = self.settings
        try:
            return self._within_budget(data, s.max_pixels, ALLOWED_FORMATS, s.max_aspect_ratio)
        except ImageLoadError as e:
            raise UnusableImageError(e.kind, f"{name}: {e.reason}") from e

    def stored(self, item: Item) -> ModelInput:
        """A gallery item's picture decoded for the model again, within the same budget as
        uploads: readers may ask for it many times at once. NotFoundError when its file is gone
        or no longer decodes; OverloadedError and DeadlineExceededError as :meth:`upload`. The
        file was accepted once, by the index builder or by an add through this service: the
        limits are the looser of both's, and any format and aspect ratio."""
        gone = NotFoundError(f"the image of gallery item {item.id} is no longer available")
        max_pixels = max(DEFAULT_MAX_PIXELS, self.settings.max_pixels)
        try:
            data = Path(item.path or "").read_bytes()
            return self._within_budget(data, max_pixels, None, None)
        except (OSError, ImageLoadError):
            raise gone from None

    def _within_budget(
        self, data: bytes, max_pixels: int, formats: frozenset[str] | None, max_aspect: float | None
    ) -> ModelInput:
        left = check_deadline()
        wait = self.settings.request_timeout_s if left is None else left
        try:
            return load_for_model(
                data,
                self.preprocessing,
                max_pixels,
                formats,
                max_aspect,
                reserve=functools.partial(self.budget.reserve, timeout=wait),
            )
        except BudgetExhaustedError:
            check_deadline()
            raise OverloadedError("too many large images are being decoded") from None
