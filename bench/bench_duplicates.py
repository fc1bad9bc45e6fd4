"""How well `near_duplicates` separates near-copies from other photos of the same species.

    .venv/bin/python bench/bench_duplicates.py --cub ../shared/data/cub-dev [--classes 16-20]

Takes up to ``--photos`` photos of the given CUB classes (by default the validation classes,
never the test classes), makes four near-copies of each (an off-centre crop keeping 75% of
each side, a mirror, a half-size rescale, a JPEG re-encoding at quality 30), indexes originals and
copies with the default model, and prints, for the pairs the global search proposes, the
global and structural similarity of copies (same source photo) and of different photos of one
species; then, for the default thresholds and a grid around them, how many copy pairs are kept
and how many other pairs pass, and how many groups ``near_duplicates`` finds against the number
of source photos.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from index_builder import GalleryIndex, build_index, scan_folder
from index_builder.duplicates import (
    GLOBAL_THRESHOLD,
    STRUCTURAL_THRESHOLD,
    candidate_pairs,
    near_duplicates,
    stored_embedding,
)
from model import Embedder, load_model
from model.datasets import read_cub
from model.matching import match_pairs


def copies(image: Image.Image, out: Path) -> None:
    w, h = image.size
    image.save(out / "original.png")
    image.crop((w // 8, 0, w // 8 + 3 * w // 4, 3 * h // 4)).save(out / "crop.png")
    ImageOps.mirror(image).save(out / "mirror.png")
    image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR).save(
        out / "small.png"
    )
    image.save(out / "jpeg.jpg", quality=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cub", type=Path, required=True)
    parser.add_argument("--classes", default="16-20", help="CUB classes (default: validation)")
    parser.add_argument("--photos", type=int, default=100)
    args = parser.parse_args()
    records = read_cub(args.cub).select(args.classes).records
    step = max(1, len(records) // args.photos)
    chosen = records[::step][: args.photos]
    model = load_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, record in enumerate(chosen):
            folder = root / "gallery" / f"{record.label:03d}-{i:04d}"
            folder.mkdir(parents=True)
            with Image.open(record.path) as image:
                copies(image.convert("RGB"), folder)
        build_index(scan_folder(root / "gallery"), root / "index", Embedder(model), workers=0)
        index = GalleryIndex.open(root / "index")
        items = index.items(index.ids)
        source = {i: str(items[i].label) for i in items}  # "<class>-<photo>"
        a, b = candidate_pairs(index, 0.0, 32, None)
        with torch.inference_mode():
            match = match_pairs(
                stored_embedding(index, a), stored_embedding(index, b), model.config.matching
            )
        g = match.global_similarity[:, 0].numpy()
        s = match.structural_similarity[:, 0].numpy()
        copy = np.array([source[x] == source[y] for x, y in zip(a, b, strict=True)])
        species = (
            np.array([source[x][:3] == source[y][:3] for x, y in zip(a, b, strict=True)]) & ~copy
        )
        print(f"{len(chosen)} photos of classes {args.classes}, 4 copies each, {len(items)} items")
        for name, mask in (("copies", copy), ("same species", species)):
            print(
                f"{name:>13}: {mask.sum():6d} pairs  global p1/p50/p99 "
                f"{np.percentile(g[mask], 1):.3f}/{np.median(g[mask]):.3f}/"
                f"{np.percentile(g[mask], 99):.3f}  structural p1/p50/p99 "
                f"{np.percentile(s[mask], 1):.3f}/{np.median(s[mask]):.3f}/"
                f"{np.percentile(s[mask], 99):.3f}"
            )
        print("global  structural  copy pairs kept  other pairs passing  groups  pure  whole")
        for gt in sorted({0.75, 0.8, 0.85, GLOBAL_THRESHOLD}):
            for st in sorted({0.65, 0.675, 0.7, 0.725, 0.75, STRUCTURAL_THRESHOLD}):
                keep = (g >= gt) & (s >= st)
                groups = near_duplicates(index, model.config.matching, gt, st)
                pure = sum(len({source[i] for i in group.ids}) == 1 for group in groups)
                whole = sum(len(group.ids) == 5 and len({source[i] for i in group.ids}) == 1
                            for group in groups)  # fmt: skip
                mark = "  (default)" if (gt, st) == (GLOBAL_THRESHOLD, STRUCTURAL_THRESHOLD) else ""
                print(
                    f"{gt:6.2f}  {st:10.3f}  {keep[copy].mean():15.3f}  {(keep & ~copy).sum():19d}"
                    f"  {len(groups):6d}  {pure:4d}  {whole:5d}{mark}"
                )
        print(
            f"groups: found for {len(chosen)} source photos; pure: holding one photo's copies "
            "only; whole: holding all 5 versions of one photo and nothing else"
        )
        index.close()


if __name__ == "__main__":
    main()
