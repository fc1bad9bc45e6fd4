"""Index builder throughput against its ceiling, bytes per item, and search latency at scale.

    .venv/bin/python bench/bench_index.py --cub ../shared/data/cub-dev   # build vs forward-only
    .venv/bin/python bench/bench_index.py --search-n 1000000             # search, synthetic

Build: images/second of ``build_index`` (decoding in worker processes, embedding, writing) on
the photos of ``--cub``, against the backbone's forward-only images/second on the same images,
already decoded, in the same batches: the ceiling a build could reach. Also the bytes per item
on disk. Search: one-query latency and recall@100 of FAISS exact ("Flat") and IVF search over
``--search-n`` synthetic clustered unit vectors (D = 128), and exact search done in torch (the
GPU path) on every device present.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from index_builder import GalleryIndex, build_index, scan_folder
from index_builder.embedding import default_workers
from index_builder.vector_index import VectorIndex, default_factory
from model import Embedder, load_image, load_model, preprocess
from model.runtime import RUNTIMES, Runtime


def bench_build(
    cub: Path, limit: int, batch_size: int, workers: int | None, inference: Runtime
) -> None:
    sources = scan_folder(cub / "images")[:limit]
    embedder = Embedder(load_model(), runtime=inference)
    spec = embedder.model.config.preprocessing
    pixels = torch.stack([preprocess(load_image(s.path), spec)[0] for s in sources])
    embedder.embed_pixels(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        embedder.embed_pixels(pixels[i : i + batch_size])
    ceiling = len(pixels) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = build_index(sources, Path(tmp) / "index", embedder, batch_size=batch_size,
                             workers=workers)  # fmt: skip
        rate = report.indexed / (time.perf_counter() - start)
        index = GalleryIndex.open(Path(tmp) / "index")
        info = index.info()
        index.close()
    threads = torch.get_num_threads()
    workers = default_workers(embedder.device) if workers is None else workers
    print(
        f"\nbuild, {len(sources)} CUB photos, default model (MobileNetV2 head-less, 4x4 grid), "
        f"batch {batch_size}, {workers} decoding workers, {threads} threads, backbone "
        f"run by {embedder.runtime}"
    )
    print(f"  forward-only ceiling : {ceiling:7.1f} images/s")
    print(f"  diml index build     : {rate:7.1f} images/s = {100 * rate / ceiling:.0f}% of ceiling")
    print(
        f"  bytes per item       : {info['bytes_per_item']:,} "
        f"(grids {16 * info['dim'] * 2:,} float16 + vector {info['dim'] * 4:,} float32 + table)"
    )


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        end = min(n, start + 100_000)
        x[start:end] = centres[rng.integers(0, 1000, end - start)]
        x[start:end] += 1.5 * rng.standard_normal((end - start, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_search(n: int, d: int, queries: int, k: int) -> None:
    x = clustered(n, d)
    q = x[np.random.default_rng(1).choice(n, queries, replace=False)]
    ids = np.arange(n, dtype=np.int64)
    flat = VectorIndex.create("Flat", d)
    flat.add(ids, x)
    truth = flat.search(q, k)[1]
    print(f"\nsearch, {n:,} synthetic clustered unit vectors, D={d}, one query at a time, k={k}")
    print(f"  {'index':<26} {'ms/query':>9} {'recall@' + str(k):>11}")
    one = q[:1]
    ms = median_ms(lambda: flat.search(one, k), 20)
    print(f"  {'FAISS Flat (exact), CPU':<26} {ms:9.2f} {1.0:11.3f}")
    factory = default_factory(n) if n >= 100_000 else "IVF256,Flat"
    ivf = VectorIndex.create(factory, d)
    start = time.perf_counter()
    ivf.train(x[np.random.default_rng(2).choice(n, ivf.training_size(n), replace=False)])
    ivf.add(ids, x)
    built = time.perf_counter() - start
    for nprobe in (16, 64, 256):
        found = ivf.search(q, k, nprobe=nprobe)[1]
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found, strict=True)])
        ms = median_ms(lambda: ivf.search(one, k, nprobe=nprobe), 20)  # noqa: B023
        print(f"  {factory + f' nprobe={nprobe}':<26} {ms:9.2f} {recall:11.3f}")
    print(f"  ({factory} trained and filled in {built:.1f} s)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        gallery = torch.from_numpy(x).to(device)
        query = torch.from_numpy(one).to(device)

        def torch_exact() -> None:
            torch.topk(query @ gallery.T, k).indices.cpu()  # noqa: B023

        torch_exact()
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"  {'torch exact, ' + name:<26} {median_ms(torch_exact, 20):9.2f} {1.0:11.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cub", type=Path, help="CUB folder for the build benchmark")
    parser.add_argument(
        "--limit", type=int, default=2000, help="photos to build from (default all)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="decoding processes (default: the builder's)")
    parser.add_argument("--inference", choices=RUNTIMES, default="auto", help="backbone runtime")
    parser.add_argument(
        "--search-n", type=int, default=0, help="synthetic items for the search part"
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100, help="queries for recall")
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, faiss {faiss.__version__}")
    if args.cub:
        bench_build(args.cub, args.limit, args.batch_size, args.workers, args.inference)
    if args.search_n:
        bench_search(args.search_n, args.dim, args.queries, args.k)
    if not args.cub and not args.search_n:
        parser.error("give --cub DIR, --search-n N, or both")


if __name__ == "__main__":
    main()
