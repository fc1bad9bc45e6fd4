"""How well near-duplicates are found, and how fast ``GET /duplicates`` answers.

    .venv/bin/python bench/bench_duplicates.py --cub ../shared/data/cub-dev [--classes 16-20]
    .venv/bin/python bench/bench_duplicates.py --synthetic 2000

``--cub``: takes up to ``--photos`` photos of the given CUB classes (by default the validation
classes, never the test classes), makes four near-copies of each (an off-centre crop keeping
75% of each side, a mirror, a half-size rescale, a JPEG re-encoding at quality 30), indexes
originals and copies with the default model, and prints, for the pairs the global search
proposes, the global and structural similarity of copies (same source photo) and of different
photos of one species; then, for the default thresholds and a grid around them, how many copy
pairs are kept and how many other pairs pass, and how many groups are found against the number
of source photos.

``--synthetic N``: a folder index of N items of the default model's shape (4 x 4 grids of 1280
channels) made of random vectors, five noisy copies of each "photo", photos in "species" of 20,
so that copies have a global similarity near 0.91 and photos of one species near 0.70. Times
the cached neighbour graph (the first answer, another threshold, a lower one, an answer after
an add) against matching afresh; then serves the index and times ``GET /duplicates`` with new
thresholds while another client reads ``GET /gallery/{id}`` every 50 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from index_builder import (
    Embedded,
    GalleryIndex,
    Source,
    add_embedded,
    build_index,
    scan_folder,
    writing,
)
from index_builder.duplicates import (
    GLOBAL_THRESHOLD,
    STRUCTURAL_THRESHOLD,
    NeighbourGraph,
    match_graph,
    near_duplicates,
    neighbour_graph,
)
from model import Embedder, fingerprint, load_model
from model.config import MatchingConfig
from model.datasets import read_cub

T = TypeVar("T")


def copies(image: Image.Image, out: Path) -> None:
    w, h = image.size
    image.save(out / "original.png")
    image.crop((w // 8, 0, w // 8 + 3 * w // 4, 3 * h // 4)).save(out / "crop.png")
    ImageOps.mirror(image).save(out / "mirror.png")
    image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR).save(
        out / "small.png"
    )
    image.save(out / "jpeg.jpg", quality=30)


def matched(
    graph: NeighbourGraph, index: GalleryIndex, matching: MatchingConfig, threshold: float
) -> NeighbourGraph:
    """``graph`` with every pair that ``threshold`` proposes matched."""
    for done in match_graph(graph, index, matching, threshold):
        graph = done
    return graph


def quality(args: argparse.Namespace) -> None:
    records = read_cub(args.cub).select(args.classes).records
    step = max(1, len(records) // args.photos)
    chosen = records[::step][: args.photos]
    model = load_model(None)
    matching = model.config.matching
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
        wide = matched(neighbour_graph(index, 32), index, matching, 0.0)
        keep = wide.found >= 0.0
        a, b = wide.a[keep], wide.b[keep]
        g, s = wide.global_similarity[keep], wide.structural_similarity[keep]
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
        global_grid = sorted({0.75, 0.8, 0.85, GLOBAL_THRESHOLD})
        graph = matched(neighbour_graph(index), index, matching, global_grid[0])
        print("global  structural  copy pairs kept  other pairs passing  groups  pure  whole")
        for gt in global_grid:
            for st in sorted({0.65, 0.675, 0.7, 0.725, 0.75, STRUCTURAL_THRESHOLD}):
                kept = (g >= gt) & (s >= st)
                found = graph.groups(gt, st)
                groups = found.page(0, len(found))
                pure = sum(len({source[i] for i in group.ids}) == 1 for group in groups)
                whole = sum(len(group.ids) == 5 and len({source[i] for i in group.ids}) == 1
                            for group in groups)  # fmt: skip
                mark = "  (default)" if (gt, st) == (GLOBAL_THRESHOLD, STRUCTURAL_THRESHOLD) else ""
                print(
                    f"{gt:6.2f}  {st:10.3f}  {kept[copy].mean():15.3f}  {(kept & ~copy).sum():19d}"
                    f"  {len(groups):6d}  {pure:4d}  {whole:5d}{mark}"
                )
        print(
            f"groups: found for {len(chosen)} source photos; pure: holding one photo's copies "
            "only; whole: holding all 5 versions of one photo and nothing else"
        )
        index.close()


def synthetic(count: int, seed: int, grid: int = 4, dim: int = 1280) -> list[Embedded]:
    """``count`` items: five noisy copies of each photo, photos in species of 20 (see above)."""
    rng = np.random.default_rng(seed)
    r, photos = grid * grid, -(-count // 5)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    species = np.repeat(normal(-(-photos // 20), r, dim), 20, 0)[:photos]
    photo = 1.2 * species + 0.45 * normal(photos, 1, dim) + normal(photos, r, dim)
    noise = rng.uniform(1.0, 1.8, size=(count, 1, 1)).astype(np.float32)
    raw = 0.9 * normal(dim) + np.repeat(photo, 5, 0)[:count] + noise * normal(count, r, dim)
    vectors = raw.mean(1) / np.linalg.norm(raw.mean(1), axis=1, keepdims=True)
    grids = (raw / np.linalg.norm(raw, axis=2, keepdims=True)).astype(np.float16)
    return [Embedded(Source(Path(f"/synthetic/{seed}-{i:06d}.png"), f"{seed}-{i}", str(i // 100)),
                     hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(), 224, 224, vectors[i],
                     grids[i]) for i in range(count)]  # fmt: skip


def timed(what: str, work: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = work()
    print(f"{what:<58} {(time.perf_counter() - started) * 1000:9.1f} ms", flush=True)
    return result


def speed(args: argparse.Namespace) -> None:
    model = load_model(None)
    matching = model.config.matching
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        build_index([], folder, Embedder(model), workers=0)
        with writing(folder, fingerprint(model)) as index:
            add_embedded(index, synthetic(args.synthetic, seed=0))
        print(f"{args.synthetic} synthetic items; times on {torch.get_num_threads()} CPU threads")
        with writing(folder) as index:
            timed("matching afresh at 0.8 / 0.7 (every call before the cache)",
                  lambda: near_duplicates(index, matching, 0.8, 0.7))  # fmt: skip
            graph = timed("neighbour search (16 per item)", lambda: neighbour_graph(index, 16, 0))
            proposed = np.count_nonzero(graph.found >= 0.8)
            graph = timed(f"first answer at 0.8: match {proposed} pairs",
                          lambda: matched(graph, index, matching, 0.8))  # fmt: skip
            timed("group at 0.8 / 0.7", lambda: graph.groups(0.8, 0.7))
            timed("another threshold: group at 0.81 / 0.72", lambda: graph.groups(0.81, 0.72))
            extra = np.count_nonzero(graph.found >= 0.7) - proposed
            graph = timed(f"a lower threshold, 0.7: match {extra} more pairs",
                          lambda: matched(graph, index, matching, 0.7))  # fmt: skip
            add_embedded(index, synthetic(5, seed=1))
            known = graph
            graph = timed("after adding 5 items: neighbour search again",
                          lambda: neighbour_graph(index, 16, 1, known))  # fmt: skip
            new = len(graph.unmatched(0.7))
            graph = timed(f"... and match the {new} new pairs",
                          lambda: matched(graph, index, matching, 0.7))  # fmt: skip
        serve_while_reading(folder)


def serve_while_reading(folder: Path) -> None:
    """``GET /duplicates`` with new thresholds while another client reads an item every 50 ms."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    def find(client: TestClient, threshold: float) -> float:
        started = time.perf_counter()
        client.get("/duplicates", params={"threshold": threshold}).raise_for_status()
        return time.perf_counter() - started

    settings = Settings(index=folder, request_timeout_s=120)
    with (
        TestClient(create_app(settings, load_in_background=False)) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        client.get("/gallery/5")
        for threshold in (0.8, 0.81, 0.79, 0.7, 0.75):
            finding = pool.submit(find, client, threshold)
            reads: list[float] = []
            while not finding.done():
                time.sleep(0.05)
                started = time.perf_counter()
                client.get("/gallery/5").raise_for_status()
                reads.append(time.perf_counter() - started)
            slowest = f"{max(reads) * 1000:6.0f} ms" if reads else "     - "
            print(
                f"GET /duplicates?threshold={threshold:<5} {finding.result():8.3f} s; "
                f"GET /gallery/5 meanwhile: {len(reads):4d} reads, slowest {slowest}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cub", type=Path, help="the CUB folder: measure the quality")
    source.add_argument("--synthetic", type=int, help="items of a synthetic gallery: the speed")
    parser.add_argument("--classes", default="16-20", help="CUB classes (default: validation)")
    parser.add_argument("--photos", type=int, default=100)
    args = parser.parse_args()
    if args.cub is not None:
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
