"""Render the README's explanation picture from freely licensed sample photos.

    .venv/bin/pip install scikit-image && .venv/bin/python scripts/readme_picture.py

Query: scikit-image's ``chelsea`` (a cat photographed by Stéfan van der Walt, CC0). Result: the
same photo mirrored, cropped to the lower part and rescaled, so the flow has to find each part on
the other side of the picture. Uses the default model (ImageNet MobileNetV2, head-less, 4 x 4 grid).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageOps

from model import Embedder, load_model, render_explanation
from model.cli import format_table

OUT = Path(__file__).resolve().parents[1] / "docs" / "explanation.png"


def main() -> None:
    try:
        from skimage import data
    except ImportError:
        sys.exit("needs scikit-image for its CC0 sample photos: .venv/bin/pip install scikit-image")
    query = Image.fromarray(data.chelsea())
    width, height = query.size
    result = ImageOps.mirror(query).crop((0, int(0.25 * height), int(0.8 * width), height))
    result = result.resize((round(result.width * 0.75), round(result.height * 0.75)))
    explanation = Embedder(load_model()).explain(query, result, top=5)
    OUT.parent.mkdir(exist_ok=True)
    render_explanation(query, result, explanation, top=5).save(OUT, optimize=True)
    print(format_table(explanation, "chelsea", "chelsea mirrored, cropped, rescaled"))
    print(f"picture: {OUT}")


if __name__ == "__main__":
    main()
