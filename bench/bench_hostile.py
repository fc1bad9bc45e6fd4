"""What small hostile files cost Pillow on its own, and what the loader makes of them.

    .venv/bin/python bench/bench_hostile.py [--json out.json] [--only NAME]

For each file of ``tests/hostile.py`` quoted in docs/limits.md, in a fresh process each:
Pillow's own ``Image.open``, ``load`` and ``ImageOps.exif_transpose`` (which reads the metadata)
with its default settings, no pixel limit: what an unguarded decoder pays in seconds and peak
resident growth, and whether it succeeded; then ``model.preprocessing.load_for_model`` with
``configure_decoders()`` and the service's default pixel limit, as the service runs it (the kind
of refusal, or "loaded", and its seconds). Fresh processes keep one file's memory out of the
next one's figure. About two minutes on a 2-core machine, most of it the unguarded decodes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.image_limits import MAX_PYTHON_DECODED_BYTES  # noqa: E402
from tests.hostile import (  # noqa: E402 - the builders live with the tests
    ELEMENT_BOMBS,
    jpeg_with_scans,
    png_with_text,
    rle_bmp,
    rle_row_padding,
    tiff_with_entries,
    tiled_tiff,
)

CASES: dict[str, Callable[[], bytes]] = {
    "JPEG, 16 MB of fill bytes": lambda: ELEMENT_BOMBS["JPEG fill bytes"](16_000_000),
    "JPEG, 4 million empty APP1 segments": lambda: ELEMENT_BOMBS["JPEG empty APP1 segments"](
        4_000_000
    ),
    "JPEG in 2,000 scans": lambda: jpeg_with_scans(4_000, 2_000),
    "PNG, 1 million empty chunks": lambda: ELEMENT_BOMBS["PNG empty chunks"](1_000_000),
    "PNG, 63 MB of zTXt text": lambda: png_with_text(63),
    "GIF, 2 million one-byte comment sub-blocks": lambda: ELEMENT_BOMBS[
        "GIF one-byte comment sub-blocks"
    ](2_000_000),
    "TIFF, 2.25 million 1 x 1 tiles": lambda: tiled_tiff(1_500, 1),
    "TIFF, BitsPerSample of 5 million numbers": lambda: tiff_with_entries(
        {258: (3, [8] * 5_000_000)}
    ),
    "RLE8 BMP 6000 x 6000, one pixel and an end-of-row a row": lambda: rle_row_padding(6_000),
    "RLE8 BMP 6000 x 6000, 10 million one-pixel runs": lambda: rle_bmp(
        6_000, 6_000, b"\x01\x07" * 10_000_000
    ),
    "RLE8 BMP 2048 x 2048, 4 MB of one-pixel runs": lambda: rle_bmp(
        2_048, 2_048, b"\x01\x07" * (2 << 20)
    ),
    # The worst that the limits on Python-decoded images let through: the loader decodes them.
    "RLE8 BMP 2048 x 2048, one pixel and an end-of-row a row": lambda: rle_row_padding(2_048),
    "RLE8 BMP 2048 x 2048, 2 MB of one-pixel runs": lambda: rle_bmp(
        2_048, 2_048, b"\x01\x07" * ((MAX_PYTHON_DECODED_BYTES - len(rle_bmp(1, 1, b""))) // 2)
    ),
}

# Peak resident memory from /proc (VmHWM, this process's own: ru_maxrss would start at what
# the parent held when it forked).
PILLOW = """
import io, json, sys, time
from PIL import Image, ImageOps
Image.MAX_IMAGE_PIXELS = None

def peak_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

data = open(sys.argv[1], "rb").read()
before = peak_kb()
start = time.perf_counter()
try:
    image = Image.open(io.BytesIO(data))
    image.load()
    ImageOps.exif_transpose(image)
    outcome = "decoded"
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"[:80]
seconds = time.perf_counter() - start
grown = (peak_kb() - before) / 1024
print(json.dumps({"seconds": seconds, "peak_mb": grown, "outcome": outcome}))
"""

LOADER = """
import json, sys, time
from model.config import Preprocessing
from model.decoding import configure_decoders
from model.image_limits import ImageLoadError
from model.preprocessing import load_for_model
from service.settings import Settings
configure_decoders()
data = open(sys.argv[1], "rb").read()
start = time.perf_counter()
try:
    load_for_model(data, Preprocessing(), Settings().max_pixels)
    kind = "loaded"
except ImageLoadError as e:
    kind = e.kind
print(json.dumps({"seconds": time.perf_counter() - start, "kind": kind}))
"""


def measure(code: str, path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--only", help="only the cases whose name contains this")
    args = parser.parse_args()
    rows = []
    print(
        f"{'file':58} {'bytes':>11}  {'Pillow alone: s':>15} {'peak MB':>8}  outcome"
        f"{'':28} loader: kind, s"
    )
    with tempfile.TemporaryDirectory() as folder:
        for name, make in CASES.items():
            if args.only and args.only not in name:
                continue
            path = Path(folder) / "file"
            data = make()
            path.write_bytes(data)
            raw, guarded = measure(PILLOW, path), measure(LOADER, path)
            rows.append({"file": name, "bytes": len(data), "pillow": raw, "loader": guarded})
            print(
                f"{name:58} {len(data):>11,}  {raw['seconds']:>15.2f} {raw['peak_mb']:>8.0f}  "
                f"{str(raw['outcome'])[:34]:34} {guarded['kind']}, {guarded['seconds']:.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
