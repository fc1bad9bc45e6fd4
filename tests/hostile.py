"""Hostile image files made from scratch (never fetched): headers that lie about their size,
formats Pillow knows but the service does not accept."""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from model.file_structure import NUMBERS_PER_STEP


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit RGB pixels and holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def dds_header() -> bytes:
    """The start of a DirectDraw Surface: Pillow has a plugin for it; the service accepts none."""
    return b"DDS " + struct.pack("<I", 124) + bytes(120)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    return data[:offset] + struct.pack(fmt, *values) + data[offset + struct.calcsize(fmt) :]


def header_bombs(width: int, height: int) -> dict[str, bytes]:
    """A small file in every accepted format whose header declares ``width`` x ``height``
    pixels (each a real file of one or a few pixels with its size fields rewritten)."""
    tiny = Image.new("RGB", (8, 8), (120, 60, 30))
    jpeg = encode(tiny, "JPEG")
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    bmp = encode(tiny, "BMP")  # BITMAPINFOHEADER: width and height at bytes 18 and 22
    w16, h16 = min(width, 65535), min(height, 65535)  # JPEG and GIF sizes are 16-bit
    gif = encode(tiny.convert("P"), "GIF")
    descriptor = _first_gif_frame(gif)
    gif = _patched(_patched(gif, 6, "<HH", w16, h16), descriptor + 5, "<HH", w16, h16)
    webp = encode(tiny, "WEBP", quality=50)  # VP8 key frame: 14-bit sizes after the start code
    start = webp.index(b"\x9d\x01\x2a") + 3
    return {
        "PNG": png_header(width, height),
        "JPEG": _patched(jpeg, sof + 5, ">HH", h16, w16),
        "BMP": _patched(bmp, 18, "<ii", width, height),
        "GIF": gif,
        "WEBP": _patched(webp, start, "<HH", min(width, 16383), min(height, 16383)),
        "TIFF": tiff_header(width, height),
    }


def _first_gif_frame(gif: bytes) -> int:
    """Offset of the first image descriptor (left, top, width, height follow the 0x2C)."""
    flags = gif[10]
    position = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)  # past the colour table
    while gif[position] == 0x21:  # extension blocks: label, then sub-blocks up to a 0 length
        position += 2
        while gif[position]:
            position += gif[position] + 1
        position += 1
    assert gif[position] == 0x2C
    return position


def tiff_header(width: int, height: int) -> bytes:
    """An uncompressed 8-bit grayscale TIFF that declares ``width`` x ``height`` and holds one
    row of pixel data."""
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, height), (279, 4, width * height),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(width)


def long_png(width: int, height: int) -> bytes:
    """A real grayscale PNG of ``width`` x ``height`` (it compresses to almost nothing)."""
    return encode(Image.new("L", (width, height), 90), "PNG")


def sixteen_bit_png(side: int) -> bytes:
    """A real ``side`` x ``side`` 16-bit grayscale PNG."""
    return encode(Image.new("I;16", (side, side), 40000), "PNG")


def jpeg_without_scan(width: int, height: int) -> bytes:
    """A JPEG of ``width`` x ``height`` cut after its scan header, with an end marker appended:
    libjpeg fills the missing pixels with grey and reports no error."""
    jpeg = encode(Image.new("L", (width, height), 128), "JPEG", quality=10)
    sos = jpeg.index(b"\xff\xda")
    length = struct.unpack(">H", jpeg[sos + 2 : sos + 4])[0]
    return jpeg[: sos + 2 + length] + b"\xff\xd9"


def jpeg_with_scans(side: int, scans: int) -> bytes:
    """A valid progressive JPEG of ``side`` x ``side`` whose last scan is sent again until the
    file holds ``scans`` scans (31 bytes each): libjpeg decodes every one over the whole image."""
    jpeg = encode(Image.new("RGB", (side, side), (90, 140, 60)), "JPEG", progressive=True)
    last = jpeg.rindex(b"\xff\xda")
    extra = scans - jpeg.count(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * extra + b"\xff\xd9"


def exif_flood(tags: int) -> bytes:
    """A small, valid JPEG whose EXIF block lists ``tags`` entries, each pointing at more data
    than the file holds: Pillow skips each one with a warning whose text names the tag."""
    entries = b"".join(struct.pack("<HHII", 1 + i, 7, 70_000 + i, 8) for i in range(tags))
    ifd = struct.pack("<H", tags) + entries + struct.pack("<I", 0)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd
    return encode(Image.new("RGB", (64, 64), (90, 140, 60)), "JPEG", exif=exif)


def png_with_text(megabytes: int) -> bytes:
    """A 64 x 64 PNG carrying ``megabytes`` zTXt chunks of 1 MB each (about 1 KB compressed)."""
    png = encode(Image.new("RGB", (64, 64), (90, 140, 60)), "PNG")
    text = zlib.compress(b"a" * 2**20, 9)

    chunks = b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % i + text) for i in range(megabytes))
    return png[:33] + chunks + png[33:]  # after the signature and IHDR


def tiled_tiff(side: int, tile: int) -> bytes:
    """An uncompressed grey TIFF of ``side`` x ``side`` in ``tile`` x ``tile`` tiles, every tile
    entry pointing at the same data: a small file listing many tiles."""
    n = (-(-side // tile)) ** 2
    tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1),
            (322, 4, tile), (323, 4, tile)]  # fmt: skip
    offsets = 8 + 2 + 12 * (len(tags) + 2) + 4
    counts, pixels = offsets + 4 * n, offsets + 8 * n
    ifd = struct.pack("<H", len(tags) + 2)
    for tag, kind, value in tags:
        ifd += struct.pack("<HHI" + ("H2x" if kind == 3 else "I"), tag, kind, 1, value)
    ifd += struct.pack("<HHII", 324, 4, n, offsets) + struct.pack("<HHII", 325, 4, n, counts)
    ifd += struct.pack("<I", 0)
    body = struct.pack(f"<{n}I", *[pixels] * n) + struct.pack(f"<{n}I", *[tile * tile] * n)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + body + bytes(tile * tile)


# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED,
# SSHORT, SLONG, SRATIONAL, FLOAT, DOUBLE, IFD, LONG8, SLONG8, IFD8).
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8,
                   13: 4, 16: 8, 17: 8, 18: 8}  # fmt: skip


def tiff_with_entries(entries: dict[int, tuple[int, list[int]]], side: int = 32) -> bytes:
    """An uncompressed grey ``side`` x ``side`` TIFF whose first directory holds its own entries
    with ``entries`` (tag -> (field type, values), each value an integer written in the type's
    width) added or put in their place."""
    base = {256: (4, [side]), 257: (4, [side]), 258: (3, [8]), 259: (3, [1]), 262: (3, [1]),
            273: (4, [0]), 277: (3, [1]), 278: (4, [side]), 279: (4, [side * side])}  # fmt: skip
    tags = sorted({**base, **entries}.items())
    values_at = 8 + 2 + 12 * len(tags) + 4
    raws = []
    for _, (kind, values) in tags:  # each value modulo its type's width, little-endian
        size = TIFF_TYPE_SIZES[kind]
        wide = np.asarray(values, dtype=np.uint64) & np.uint64((1 << (8 * size)) - 1)
        raws.append(wide.astype(f"<u{size}").tobytes())
    pixels_at = values_at + sum(len(r) for r in raws if len(r) > 4)
    ifd, blobs = struct.pack("<H", len(tags)), b""
    for (tag, (kind, values)), raw in zip(tags, raws, strict=True):
        if tag == 273 and 273 not in entries:
            raw = struct.pack("<I", pixels_at)
        if len(raw) <= 4:
            ifd += struct.pack("<HHI", tag, kind, len(values)) + raw.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, len(values), values_at + len(blobs))
            blobs += raw
    ifd += struct.pack("<I", 0)
    pixels = bytes(i % 256 for i in range(side * side))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + blobs + pixels


def png_with_chunks(chunks: list[tuple[bytes, bytes]], after_pixels: bool = False) -> bytes:
    """A valid 8 x 8 RGB PNG with ``chunks`` (type, data) inserted after its header, or after its
    pixels (just before IEND), CRCs correct."""
    data = encode(Image.new("RGB", (8, 8), (200, 30, 90)), "PNG")
    at = data.index(b"IEND") - 4 if after_pixels else 33
    return data[:at] + b"".join(_chunk(kind, body) for kind, body in chunks) + data[at:]


def rle_bmp(width: int, height: int, commands: bytes, rle4: bool = False) -> bytes:
    """A BMP of ``width`` x ``height`` grey palette pixels (16 with ``rle4``, else 256), its
    pixel data the run-length ``commands`` as given (rows bottom up; ``count, value`` runs,
    ``0 0`` ends a row, ``0 1`` the bitmap)."""
    bits, colours = (4, 16) if rle4 else (8, 256)
    palette = b"".join(bytes((i, i, i, 0)) for i in range(colours))
    offset = 14 + 40 + len(palette)
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, 2 if rle4 else 1, len(commands), 2835, 2835,
        colours, 0,
    )  # fmt: skip
    header = b"BM" + struct.pack("<IHHI", offset + len(commands), 0, 0, offset)
    return header + info + palette + commands


def rle_row_padding(side: int) -> bytes:
    """A valid RLE8 BMP of ``side`` x ``side``: each row one pixel, then an end-of-row, which
    Pillow pads to the row's end one pixel at a time (4 bytes a row: 25 KB for 6000 x 6000)."""
    return rle_bmp(side, side, b"\x01\x07\x00\x00" * side + b"\x00\x01")


def _inserted(fmt: str, at: int | None, middle: bytes) -> bytes:
    """A small valid ``fmt`` file with ``middle`` inserted at byte ``at`` (None: before a GIF's
    first image descriptor)."""
    image = Image.new("P", (64, 64)) if fmt == "GIF" else Image.new("RGB", (64, 64), (90, 140, 60))
    data = encode(image, fmt)
    at = data.index(b",") if at is None else at
    return data[:at] + middle + data[at:]


# Valid small files of n tiny parts that Pillow's opener walks one by one, by name.
ELEMENT_BOMBS: dict[str, Callable[[int], bytes]] = {
    "JPEG fill bytes": lambda n: _inserted("JPEG", 2, b"\xff" * n),
    "JPEG empty APP1 segments": lambda n: _inserted("JPEG", 2, b"\xff\xe1\x00\x02" * n),
    "PNG empty chunks": lambda n: _inserted("PNG", 33, _chunk(b"abCd", b"") * n),
    "GIF one-byte comment sub-blocks": lambda n: _inserted(
        "GIF", None, b"\x21\xfe" + b"\x01c" * n + b"\x00"
    ),
    "TIFF 1 x 1 tiles": lambda n: tiled_tiff(math.isqrt(n) + 1, 1),
    "TIFF numbers in one entry": lambda n: tiff_with_entries(
        {258: (3, [8] * (NUMBERS_PER_STEP * n))}
    ),
}


def element_bombs(elements: int) -> dict[str, bytes]:
    """Every one of :data:`ELEMENT_BOMBS` with ``elements`` parts."""
    return {name: make(elements) for name, make in ELEMENT_BOMBS.items()}


def corpus() -> dict[str, bytes]:
    """A hostile-upload corpus made here: header bombs of every accepted format, formats that
    are not accepted, every Pillow mode, multi-frame files, truncations and byte flips."""
    rng = np.random.default_rng(11)
    photo = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    files: dict[str, bytes] = {}
    for size in [(60_000, 60_000), (6_000, 6_000), (300, 9_000)]:
        for fmt, data in header_bombs(*size).items():
            files[f"{fmt} declaring {size[0]}x{size[1]}"] = data
    for fmt in ("ICO", "TGA", "PCX", "PPM", "SGI", "IM", "EPS"):
        try:
            files[f"{fmt} (not accepted)"] = encode(photo, fmt)
        except (OSError, KeyError):  # a writer this Pillow lacks
            continue
    files["DDS header (not accepted)"] = dds_header()
    modes = {
        "1": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "I;16": "PNG", "I": "TIFF", "F": "TIFF",
        "CMYK": "JPEG", "YCbCr": "JPEG", "RGBA": "WEBP", "RGB": "BMP",
    }  # fmt: skip
    for mode, fmt in modes.items():
        files[f"{mode} {fmt}"] = encode(photo.convert(mode), fmt)
    transparent = photo.convert("P")
    files["P with transparency GIF"] = encode(transparent, "GIF", transparency=0)
    frames = [photo.rotate(angle) for angle in (0, 90, 180)]
    for fmt in ("GIF", "WEBP", "TIFF"):
        files[f"multi-frame {fmt}"] = encode(frames[0], fmt, save_all=True, append_images=frames)
    files["16-bit 6000x6000 PNG"] = sixteen_bit_png(6_000)
    files["1:19 PNG"] = long_png(1_400, 26_600)
    files["1:2500 PNG"] = long_png(126, 316_000)
    files["JPEG with no scan"] = jpeg_without_scan(6_300, 6_300)
    files["JPEG in 2,000 scans"] = jpeg_with_scans(4_000, 2_000)
    files["JPEG with 4,000 broken EXIF tags"] = exif_flood(4_000)
    files["PNG with 64 MB of compressed text"] = png_with_text(64)
    files["TIFF whose XMP tag holds numbers"] = tiff_with_entries({700: (3, [1, 2, 3])})
    files["PNG with an empty iCCP chunk after its pixels"] = png_with_chunks([(b"iCCP", b"")], True)
    files["RLE8 BMP of 6000 x 6000 padded row by row"] = rle_row_padding(6_000)
    files["RLE8 BMP of 200,000 one-pixel runs"] = rle_bmp(1_000, 1_000, b"\x01\x07" * 200_000)
    for name, data in element_bombs(70_000).items():
        files[f"{name}, 70,000"] = data
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"):
        data = encode(photo if fmt != "GIF" else photo.convert("P"), fmt)
        for cut in (0.05, 0.5, 0.95):
            files[f"{fmt} cut at {cut:.0%}"] = data[: int(len(data) * cut)]
        flipped = bytearray(data)
        for where in rng.integers(0, len(data), 6):
            flipped[where] ^= int(rng.integers(1, 255))
        files[f"{fmt} with flipped bytes"] = bytes(flipped)
    return files
