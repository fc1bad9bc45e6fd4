"""A tiny, fast, deterministic model and synthetic galleries for the index tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_builder import build_index, scan_folder
from model import Embedder, ModelConfig, Preprocessing, create_model
from model.backbones import find_mobilenet_v2_weights

TINY = ModelConfig(dim=16, grid=2, preprocessing=Preprocessing(resize=64, crop=64))


def tiny_embedder(dim: int = 16) -> Embedder:
    """ImageNet MobileNetV2 on 64 px crops with a seeded 16-d head: fast, the same in every
    process, and (unlike random backbone weights, which map every picture to about the same
    vector) able to tell the synthetic pictures apart."""
    if find_mobilenet_v2_weights() is None:
        pytest.skip("needs the ImageNet MobileNetV2 weights that scripts/setup.sh installs")
    config = ModelConfig(dim=dim, grid=2, preprocessing=TINY.preprocessing)
    return Embedder(create_model(config, weights="imagenet"))


def make_images(folder: Path, count: int, seed: int = 0, classes: int = 3) -> list[Path]:
    """``count`` distinct random pictures (coloured boxes on a coloured ground) as PNG files in
    ``classes`` subfolders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / f"class{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.empty((60 + i % 5, 80, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, size=3)
        for _ in range(4):
            y, x = rng.integers(0, 50), rng.integers(0, 70)
            h, w = rng.integers(5, 30, size=2)
            pixels[y : y + h, x : x + w] = rng.integers(0, 256, size=3)
        path = sub / f"img{seed}_{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def build_tiny(gallery: Path, out: Path, **kwargs: object) -> object:
    return build_index(scan_folder(gallery), out, tiny_embedder(), workers=0, **kwargs)  # type: ignore[arg-type]


if __name__ == "__main__":
    # Used by the crash tests: `python -m tests.index_builder.helpers build GALLERY OUT SEGMENT`
    # or `... add OUT FILE...`, run with DIML_TEST_CRASH_AT naming the point to die at.
    from index_builder import Source, add_images, writing
    from model import fingerprint

    action = sys.argv[1]
    if action == "build":
        build_tiny(Path(sys.argv[2]), Path(sys.argv[3]), segment_size=int(sys.argv[4]))
    else:
        embedder = tiny_embedder()
        with writing(sys.argv[2], fingerprint(embedder.model)) as index:
            files = [Path(p) for p in sys.argv[3:]]
            add_images(index, [Source(p, p.name) for p in files], embedder)
    print("finished")
