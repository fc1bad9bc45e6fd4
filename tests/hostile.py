"""Hostile image files made from scratch (never fetched): headers that lie about their size,
formats Pillow knows but the service does not accept."""

from __future__ import annotations

import struct
import zlib


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit RGB pixels and holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def dds_header() -> bytes:
    """The start of a DirectDraw Surface: Pillow has a plugin for it; the service accepts none."""
    return b"DDS " + struct.pack("<I", 124) + bytes(120)
