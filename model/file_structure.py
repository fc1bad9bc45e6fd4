"""How many elements Pillow's opener walks in an image file, counted from its bytes before it
is opened.

Pillow opens JPEG, PNG, GIF and TIFF files in Python, one loop step per element of the file:
JPEG marker segments and fill bytes up to the first scan, PNG chunks (the image data chunks
again while decoding), GIF extension sub-blocks up to the first image, a TIFF's first directory,
the strips or tiles it lists (one tile entry each, at about 330 bytes) and the numbers its
entries hold (each one read becomes a Python object). Encoders write a few to a few thousand; a
file made of millions of tiny elements is valid and costs what its size does not say, before any
pixel limit or decoding budget can see it (``bench/bench_hostile.py``, Pillow 13 on a 2-core
machine: 16 MB of JPEG fill bytes, 8.6 s; 16 MB of empty JPEG APP1 segments, 5.7 s and 524 MB;
an 18 MB TIFF of 2.25 million 1 x 1 tiles, 9.5 s and 824 MB; 4 MB of one-byte GIF comment
sub-blocks, 172 MB; a 10 MB TIFF whose BitsPerSample listed 5 million numbers, 103 MB).
:func:`parser_steps` counts them, stopping just past a limit, so the count itself is cheap
whatever the file holds.
"""

from __future__ import annotations

import struct

# What the service accepts: far above what encoders write (libjpeg writes about a dozen JPEG
# segments before its first scan, libpng an IDAT chunk per 8 KB, a 64-megapixel TIFF in
# 256 x 256 tiles has about a thousand), and below a second and about 20 MB of opening.
MAX_PARSER_STEPS = 65_536

# TIFF tags that list a file's strips or tiles: StripOffsets, StripByteCounts, TileOffsets,
# TileByteCounts.
_CHUNK_TAGS = frozenset({273, 279, 324, 325})
# TIFF field types whose values Pillow unpacks into one Python object each when it reads the tag
# (all but BYTE, ASCII, SBYTE and UNDEFINED, which stay bytes): SHORT, LONG, RATIONAL, SSHORT,
# SLONG, SRATIONAL, FLOAT, DOUBLE, IFD, LONG8, SLONG8, IFD8.
_NUMBER_TYPES = frozenset({3, 4, 5, 8, 9, 10, 11, 12, 13, 16, 17, 18})
# Numbers are unpacked in C and held at about 21 bytes each (``bench/bench_hostile.py``: 5 million
# held 103 MB), where one walked element holds 90 to 370 (a GIF sub-block, a JPEG segment, a TIFF
# tile entry): four numbers count as one step, so a directory may list 262,144 of them (the
# 196,608 of a 16-bit TransferFunction, say) and hold about 5 MB.
NUMBERS_PER_STEP = 4


def parser_steps(data: bytes, limit: int = MAX_PARSER_STEPS) -> tuple[str, str, int]:
    """``(format, what, count)``: the elements Pillow's opener would walk in ``data`` and how
    many, or ``("", "", 0)`` for other formats. The count stops at ``limit + 1``."""
    if data[:2] == b"\xff\xd8":
        steps, _ = jpeg_first_scan(data, limit)
        return "JPEG", "marker segments and fill bytes before its first scan", steps
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG", "chunks", _png(data, limit)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF", "extension sub-blocks before its first image", _gif(data, limit)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF", "directory entries, numbers in them, strips and tiles", _tiff(data, limit)
    return "", "", 0


def jpeg_first_scan(data: bytes, limit: int = MAX_PARSER_STEPS) -> tuple[int, int | None]:
    """Walk a JPEG's markers as Pillow's opener does, up to its first scan: ``(steps, where)``,
    the steps taken (stopping at ``limit + 1``) and the position of the first start-of-scan
    marker, None when there is none within them."""
    i, steps, n = 2, 0, len(data)
    while i + 1 < n and steps <= limit:
        steps += 1
        marker = data[i + 1]
        if data[i] != 0xFF or marker == 0xFF:  # junk or a fill byte: Pillow reads one byte
            i += 1
        elif marker == 0xDA:  # the first scan: libjpeg decodes from here
            return steps, i
        elif marker == 0xD9:  # the end, without a scan
            break
        elif 0xD0 <= marker <= 0xD8 or marker in (0x00, 0x01):  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return steps, None


def _png(data: bytes, limit: int) -> int:
    i, steps, n = 8, 0, len(data)
    while i + 8 <= n and steps <= limit:
        steps += 1
        if data[i + 4 : i + 8] == b"IEND":
            break
        i += 12 + int.from_bytes(data[i : i + 4], "big")
    return steps


def _gif(data: bytes, limit: int) -> int:
    if len(data) < 13:
        return 0
    flags, i, steps, n = data[10], 13, 0, len(data)
    if flags & 0x80:  # a global colour table follows the screen descriptor
        i += 3 << ((flags & 7) + 1)
    while i + 1 < n and data[i] == 0x21 and steps <= limit:  # an extension: label, sub-blocks
        i += 2
        while i < n and steps <= limit:
            steps += 1
            size = data[i]
            i += 1 + size
            if size == 0:
                break
    return steps


def _tiff(data: bytes, limit: int) -> int:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, offset)
            start, size, layout = offset + 8, 20, order + "HHQ"
        else:
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, offset)
            start, size, layout = offset + 2, 12, order + "HHI"
    except struct.error:  # too short: Pillow refuses it
        return 0
    walked = min(entries, limit + 1, max(0, (len(data) - start) // size))
    chunks = numbers = 0
    for k in range(walked):
        tag, kind, count = struct.unpack_from(layout, data, start + k * size)
        if tag in _CHUNK_TAGS:  # the offsets and the byte counts: one step per strip or tile
            chunks = max(chunks, count)
        elif kind in _NUMBER_TYPES:
            numbers += count
    return min(walked + chunks + numbers // NUMBERS_PER_STEP, limit + 1)
