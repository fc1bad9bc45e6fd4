"""Make the embedded default gallery (``gallery/``) from sample photos that Python packages ship.

Twenty scenes, each with licences that allow redistribution (docs/gallery.md),
and four real views of each: the photo, its mirror image, an off-centre crop, and a smaller
rescaled copy, so that every search has three true matches to find. One sub-folder per scene
(its label).

    .venv/bin/pip install scikit-image scikit-learn matplotlib   # only to regenerate
    .venv/bin/python scripts/make_gallery.py [--out gallery]

The output is deterministic (no randomness; fixed JPEG settings).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_SIDE = 512
QUALITY = 85


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image: np.ndarray = getattr(skimage.data, name)()
        return image

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        image: np.ndarray = load_sample_image(name)
        return image

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        path = cbook.get_sample_data(name, asfileobj=False)
        return np.asarray(Image.open(path).convert("RGB"))

    return load


# scene -> loader; provenance and licence of each are in docs/gallery.md.
SCENES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "camera": _skimage("camera"),
    "cat": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "coins": _skimage("coins"),
    "hubble": _skimage("hubble_deep_field"),
    "tissue": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "microaneurysms": _skimage("microaneurysms"),
    "rocket": _skimage("rocket"),
    "brick": _skimage("brick"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "text": _skimage("text"),
    "cell": _skimage("cell"),
    "clock": _skimage("clock"),
    "horse": _skimage("horse"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}


def to_image(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def views(image: Image.Image) -> dict[str, Image.Image]:
    """The photo, its mirror, an off-centre 75% crop, and a 60% rescale."""
    w, h = image.size
    crop = image.crop((w // 8, 0, w // 8 + 3 * w // 4, 3 * h // 4))
    small = image.resize((max(32, w * 3 // 5), max(32, h * 3 // 5)), Image.Resampling.LANCZOS)
    return {"photo": image, "mirror": ImageOps.mirror(image), "crop": crop, "small": small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gallery"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    for scene, load in SCENES.items():
        folder = args.out / scene
        folder.mkdir(parents=True)
        for view, picture in views(to_image(load())).items():
            picture.save(folder / f"{scene}-{view}.jpg", "JPEG", quality=QUALITY, optimize=True)
    total = sum(p.stat().st_size for p in args.out.rglob("*.jpg"))
    print(f"{len(SCENES)} scenes, {len(SCENES) * 4} images, {total / 1e6:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()
