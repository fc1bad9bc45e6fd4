"""Deployment settings, from the environment (``DIML_*``) or ``diml serve`` flags."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from index_builder.location import Location, QdrantLocation, parse_location
from model.image_limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of a running service. Environment: ``DIML_INDEX=/data/index`` and so on;
    key lists are comma-separated."""

    model_config = SettingsConfigDict(env_prefix="DIML_", frozen=True)

    index: str = Field("gallery.index", description="the index to serve: a folder, "
                       "qdrant://HOST[:PORT]/COLLECTION or qdrant-local:PATH")  # fmt: skip
    gallery: Path | None = Field(None, description="images (sub-folder = label) indexed "
                                 "on the first start, when INDEX holds no index")  # fmt: skip
    checkpoint: Path | None = Field(None, description="model checkpoint (default: ImageNet "
                                    "MobileNetV2, head-less)")  # fmt: skip
    device: str = "cpu"
    inference: Literal["auto", "onnx", "torch"] = Field(
        "auto", description="backbone runtime: auto (ONNX Runtime on the CPU, PyTorch on "
        "CUDA), onnx or torch")  # fmt: skip
    device_search: bool | None = Field(None, description="exact global search in torch on "
                                       "DEVICE (default: on CUDA; else FAISS)")  # fmt: skip
    device_grids: bool | None = Field(None, description="keep the part grids on DEVICE for "
                                      "re-ranking, with device search (default: on CUDA when "
                                      "they take at most half its free memory)")  # fmt: skip
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="request body limit")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="decoded image size limit "
                            "(pixels, read from the header)")  # fmt: skip
    max_aspect_ratio: float = Field(DEFAULT_MAX_ASPECT, ge=1, description="longer side / "
                                    "shorter side limit")  # fmt: skip
    decode_memory_mb: int = Field(512, gt=0, description="memory that images being decoded "
                                  "may hold at once; past it, decodes wait, then 503")  # fmt: skip
    basis_cache_mb: int = Field(128, ge=0, description="memory for gallery items' global "
                                "bases, kept to explain the global term without embedding "
                                "their pictures again")  # fmt: skip
    max_batch_images: int = Field(16, gt=0, description="images in one batch search")
    max_batch_queries: int = Field(64, gt=0, description="queries searched and re-ranked "
                                   "together across concurrent requests")  # fmt: skip
    batch_window_ms: float = Field(2.0, ge=0, description="micro-batching wait for company")
    max_queue: int = Field(64, gt=0, description="images waiting for the backbone; past it 503")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline")
    body_timeout_s: float = Field(60.0, gt=0, description="time to send a request body")
    body_idle_timeout_s: float = Field(10.0, gt=0, description="longest pause in a body")
    header_timeout_s: float = Field(10.0, gt=0, description="time to send a request's line "
                                    "and headers; past it, the connection closes")  # fmt: skip
    max_connections: int = Field(256, gt=0, description="open connections and requests at "
                                 "once; past it, 503")  # fmt: skip
    keep_alive_s: int = Field(5, gt=0, description="idle time before a kept-alive connection "
                              "is closed")  # fmt: skip
    read_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    write_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_writes: bool = Field(True, description="open the index for writing (else read-only)")
    anonymous_writes: Literal["off", "loopback", "any"] = Field(
        "off", description="gallery changes without a write key (only when no write key is "
        "set): off, from loopback clients only, or from anyone")  # fmt: skip
    protect_metrics: bool = Field(False, description="/metrics needs a read key")
    uploads: Path | None = Field(None, description="where added images are kept (default: "
                                 "INDEX/uploads; ./uploads for a Qdrant index, whose API "
                                 "replicas should share one folder)")  # fmt: skip

    @field_validator("index", mode="before")
    @classmethod
    def _index_text(cls, value: object) -> object:
        text = str(value) if isinstance(value, Path) else value
        if isinstance(text, str):
            parse_location(text)  # a Qdrant URL it cannot read is refused here, saying why
        return text

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError("not a device; use cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _protection_needs_read_keys(self) -> Settings:
        if self.protect_metrics and not self.read_keys:
            raise ValueError("DIML_PROTECT_METRICS needs DIML_READ_KEYS: /metrics asks for a "
                             "read key, and with none set every request is let in; set "
                             "DIML_READ_KEYS, or DIML_PROTECT_METRICS=false")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _writes_can_happen(self) -> Settings:
        """Write settings that could never be used: anonymous writes beside write keys (the
        keys win) or on a read-only server, and write keys where nothing asks for a key."""
        anonymous = f"DIML_ANONYMOUS_WRITES={self.anonymous_writes}"
        if self.anonymous_writes != "off" and self.write_keys:
            raise ValueError(f"{anonymous} applies only when no write key is set, and "
                             "DIML_WRITE_KEYS is set, so every gallery change needs a key; "
                             "drop DIML_ANONYMOUS_WRITES, or DIML_WRITE_KEYS")  # fmt: skip
        if self.anonymous_writes != "off" and not self.allow_writes:
            raise ValueError(f"{anonymous} opens gallery changes, and DIML_ALLOW_WRITES=false "
                             "serves the index read-only; drop DIML_ANONYMOUS_WRITES, or set "
                             "DIML_ALLOW_WRITES=true")  # fmt: skip
        if self.write_keys and not self.allow_writes and not self.read_keys:
            raise ValueError("DIML_WRITE_KEYS allow gallery changes, and DIML_ALLOW_WRITES="
                             "false serves the index read-only with open searches (no "
                             "DIML_READ_KEYS): the keys would do nothing; drop DIML_WRITE_KEYS, "
                             "set DIML_ALLOW_WRITES=true, or add DIML_READ_KEYS")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _grids_need_device_search(self) -> Settings:
        if self.device_grids and self.device_search is False:
            raise ValueError("DIML_DEVICE_GRIDS needs DIML_DEVICE_SEARCH: the grids kept on the "
                             "device are those of the items device search holds; turn both on, "
                             "or DIML_DEVICE_GRIDS off")  # fmt: skip
        return self

    @field_validator("read_keys", "write_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split(value)

    @property
    def location(self) -> Location:
        """The index's location (:func:`index_builder.location.parse_location`)."""
        return parse_location(self.index)

    @property
    def uploads_dir(self) -> Path:
        if self.uploads is not None:
            return self.uploads
        location = self.location
        return Path("uploads").absolute() if isinstance(location, QdrantLocation) else (
            location / "uploads")  # fmt: skip


@lru_cache
def get_settings() -> Settings:
    return Settings()
