"""How the service grows with its gallery: build time, bytes per item, memory and ``/search``
latency at 10k, 100k and 1M items, and whether the approximate coarse stage changes results.

    .venv/bin/python bench/scale_bench.py --cub ../shared/data/cub-dev         # default model
    .venv/bin/python bench/scale_bench.py --cub ../shared/data/cub-dev \\
        --checkpoint runs/cub/best.safetensors --sizes 10000 100000 1000000 --plot   # 128-d
    .venv/bin/python bench/scale_bench.py --plot-from out/scale/scale.json   # the plot only

**The gallery items are perturbed copies of real embeddings, not embedded photos.** The 1,701
CUB-200-2011 development photos (``--cub``) are embedded once with the model (cached under
``--cache``, keyed by the model's fingerprint); gallery item ``i`` is photo ``i mod 1701``'s
global vector and each of its part vectors plus Gaussian noise, each renormalised to unit length:

    x_i = normalize(x_photo + sigma * n / sqrt(D)),   n ~ N(0, I_D),   seeded by ``--seed``

The noise is scaled by ``1 / sqrt(D)`` so that its length is about ``sigma`` whatever the width:
a per-coordinate ``sigma`` of 0.05 would give a noise 1.8 times as long as the unit vector at
D = 1280 (cosine to its photo 0.49: the copies would be mostly noise) but only 0.57 times at
D = 128, and the two models' galleries would not be comparable. ``sigma`` = 0.1 (the default)
keeps each copy at cosine 0.995 from its photo and about 0.99 from the photo's other copies:
distinct vectors (storing a part in int8 moves it by an eighth of the noise's length at
D = 1280), still far closer to their photo than the photo's nearest other photo is (median
cosine 0.835 with the default model). So the gallery is 1,701 tight clusters of near-copies:
realistic for the sizes of the stored arrays and the work of every stage, optimistic for the
coarse stage's recall (the nearest neighbours of a query sit in few IVF lists), and no measure
of retrieval quality. The global vector and the parts are perturbed independently (the vector
is then no longer exactly the mean of the parts; nothing in the search relies on it). Items
carry no picture, so the service cannot re-embed a hit to split its explanation's global term
over the hit's regions (it logs that and leaves the term whole): ``/search`` here costs what a
gallery whose hits' bases are cached costs, not the first explanation of a hit (about 30 ms
more for ten hits, docs/measured.md).

For each size N in ``--sizes``:

1. **Build** an index folder through the steps of ``diml index build``
   (:func:`index_builder.build.build_index`, less the decoding and embedding of images): segments
   of the build's segment size written and committed to the item table in ``.building``, then
   :func:`index_builder.build._finish` (the FAISS index of the project's default factory for N,
   :func:`index_builder.vector_index.default_factory`: exact while a query reads under 12.8 M
   floats, 100k items at 128-d, 10k at 1,280-d; IVF above, trained on the build's sample; the
   snapshot; the manifest), published as the live version. Timed (items/s without generating
   the copies); bytes per item from ``GalleryIndex.info()``; the peak RSS of this process
   during the build (it holds the model and the real embeddings before:
   ``rss_before_build_mib``).
2. **Coarse stage**: ``--queries`` held-out perturbed copies (not in the gallery), searched by the
   index's own coarse search (IVF: its default ``nprobe``) and by exact inner product (FAISS
   Flat over the same stored vectors): recall@100 of the first against the second, and the share
   of queries whose final top 10 is the same (same items, same order) when the service's search
   (:meth:`service.searching.Retrieval.batch`: coarse, gather, re-rank the top ``rerank_k`` = 100
   by global + w x structural, rank) runs on either coarse stage, at the model's structural
   weight and at w = 1 (a query whose candidates are the same both ways, in the same order, is
   counted unchanged without searching it twice). Where the index is exact (``Flat``), both
   agree by construction.
3. **Serve**: ``diml serve --index`` (read-only, the CPU default backbone runtime), ``POST
   /search`` (k = 10, rerank_k = 100, explanations on) with real CUB photos as queries from 1 and
   16 concurrent clients, ``--requests`` each: client p50/p99 latency, requests/s, the server's
   RSS (``VmRSS``) after the load and its peak (``VmHWM``), and how long it took to be ready.

Sizes whose disk or memory would not fit are skipped with the reason: per-item bytes come from
the smallest size built (before that, from the model's shape), free disk from
``shutil.disk_usage(--cache)``, memory from ``MemAvailable``; the memory needed is the larger of
three copies of the global vectors (index, gathered vectors, exact index: the build and the
coarse check) and the served index's vectors plus its part grids (read on every search), plus
1.5 GiB. The default model (D = 1280, 4 x 4 grid, about 31 KB per item) fits 100k here, not 1M;
a 128-d checkpoint (about 3.7 KB per item) fits 1M.

One table row per size is printed; every number goes to ``--out`` (JSON, written after each
size). ``--plot`` (after a run) or ``--plot-from`` (from JSON files, one series each) draws
``/search`` p50 latency and the server's RSS against N (log x axis) to ``--png``
(docs/scale.png); that needs matplotlib, which the project does not install.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_service import running, send  # noqa: E402

from index_builder import GalleryIndex, NewItem, build_index, has_index  # noqa: E402
from index_builder.build import _finish, _resume_or_start  # noqa: E402
from index_builder.files import writer_lock  # noqa: E402
from index_builder.gallery import BUILDING  # noqa: E402
from index_builder.segments import SegmentStore  # noqa: E402
from index_builder.vector_index import VectorIndex, default_factory  # noqa: E402
from index_builder.versions import publish  # noqa: E402
from model import Embedding, fingerprint, load_model  # noqa: E402
from model.datasets import read_dataset  # noqa: E402
from model.loading import embed_records  # noqa: E402
from model.network import EmbeddingNet  # noqa: E402
from model.preprocessing import geometry_of  # noqa: E402
from model.quantization import packed_dtype, stored_bytes  # noqa: E402
from service.batching import SearchJob  # noqa: E402
from service.gallery import Gallery  # noqa: E402
from service.metrics import Metrics, StageTimer  # noqa: E402
from service.search import SearchOptions  # noqa: E402
from service.searching import Retrieval  # noqa: E402

GiB = 2**30
SEGMENT = int(inspect.signature(build_index).parameters["segment_size"].default)
RERANK_K, K = 100, 10
CLIENTS = (1, 16)
RESERVE_RAM = int(1.5 * GiB)  # the model, the runtime, the server's Python
RESERVE_DISK = 2 * GiB
QUERY_BATCH = 16  # queries per call of the service's search in the coarse check
STREAM_ITEMS, STREAM_QUERIES = 0, 1  # the seed streams of gallery items and held-out queries


# -- the real embeddings and their perturbed copies ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Base:
    """The embedded photos: parts (n, R, D) and vectors (n, D) float32 (parts as the index stores
    them: int8 with a scale per part, read back), labels (n,), original sizes (n, 2), paths."""

    parts: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.vectors)


def real_embeddings(model: EmbeddingNet, fp: str, cub: Path, cache: Path) -> tuple[Base, float]:
    """The photos of ``cub`` embedded by ``model`` (read from ``cache`` when there) and the
    seconds it took (0 when cached)."""
    path = cache / f"cub-embeddings-{fp[:16]}.npz"
    if not path.is_file():
        records = read_dataset(cub).records
        print(f"embedding {len(records)} photos of {cub} (cached in {path}) ...", flush=True)
        start = time.perf_counter()
        embedding, geometry = embed_records(model, records, torch.device("cpu"))
        seconds = time.perf_counter() - start
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".npz", delete=False) as f:
            np.savez(f, parts=embedding.parts.numpy(), vectors=embedding.vector.numpy(),
                     labels=np.array([r.label for r in records]),
                     sizes=geometry[:, :2].numpy().astype(np.int64),
                     paths=np.array([str(r.path) for r in records]))  # fmt: skip
        Path(f.name).replace(path)
    else:
        seconds = 0.0
    with np.load(path) as saved:
        base = Base(saved["parts"].astype(np.float32), saved["vectors"].astype(np.float32),
                    saved["labels"], saved["sizes"], [str(p) for p in saved["paths"]])  # fmt: skip
    return base, seconds


def perturb(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit rows (..., D) plus noise of length about ``sigma``, renormalised: float32."""
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    y = x + noise * np.float32(sigma / np.sqrt(x.shape[-1]))
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    return y


def copies(
    base: Base, start: int, stop: int, sigma: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Gallery items ``start .. stop - 1`` (within one block of :data:`SEGMENT` items, whose
    noise comes from its own seed, so that an item is the same whatever the sizes run):
    vectors (n, D) and grids (n, R, D), float32."""
    block = start // SEGMENT
    if stop > (block + 1) * SEGMENT:
        raise ValueError("copies() makes the items of one block at a time")
    rng = np.random.default_rng([seed, STREAM_ITEMS, block])
    photo = np.arange(block * SEGMENT, stop) % len(base)
    vectors = perturb(base.vectors[photo], sigma, rng)
    grids = perturb(base.parts[photo], sigma, rng)
    skip = start - block * SEGMENT
    return vectors[skip:], grids[skip:]


def held_out(base: Base, count: int, sigma: float, seed: int) -> tuple[Embedding, np.ndarray]:
    """``count`` perturbed copies of the photos that no gallery holds (another seed stream), as
    a query Embedding, and the photos they copy."""
    rng = np.random.default_rng([seed, STREAM_QUERIES])
    photo = rng.choice(len(base), size=count, replace=count > len(base))
    vectors = perturb(base.vectors[photo], sigma, rng)
    parts = perturb(base.parts[photo], sigma, rng)
    return Embedding(torch.from_numpy(parts), torch.from_numpy(vectors)), photo


# -- building -----------------------------------------------------------------------------------


def build(
    folder: Path, model: EmbeddingNet, fp: str, base: Base, n: int, sigma: float, seed: int
) -> dict[str, Any]:
    """An index of ``n`` copies in ``folder`` made as ``build_index`` makes one (see the module
    docstring), timed step by step."""
    before = rss_mib("self")
    reset_peak_rss()
    generate = write = 0.0
    start = time.perf_counter()
    with writer_lock(folder):
        work = folder / BUILDING
        table = _resume_or_start(work, fp, None, [])
        store = SegmentStore(work)
        for first in range(0, n, SEGMENT):
            last = min(first + SEGMENT, n)
            t0 = time.perf_counter()
            vectors, grids = copies(base, first, last, sigma, seed)
            items = [new_item(base, i, seed) for i in range(first, last)]
            t1 = time.perf_counter()
            segment = store.write(table.next_segment(), vectors, grids)
            table.commit_segment(segment, table.next_id(), items)
            write += time.perf_counter() - t1
            generate += t1 - t0
            if (last // SEGMENT) % 50 == 0 or last == n:
                print(f"   written {last:,} / {n:,} items", flush=True)
            del vectors, grids
        t0 = time.perf_counter()
        _finish(work, table, store, model, fp, None)
        finish = time.perf_counter() - t0
        table.close()
        publish(folder, work)
    total = time.perf_counter() - start - generate
    index = GalleryIndex.open(folder, fp)
    info = index.info()
    index.close()
    return {
        "factory": info["factory"],
        "count": info["count"],
        "build_s": round(total, 2),
        "items_per_s": round(n / total, 1),
        "write_s": round(write, 2),
        "faiss_and_manifest_s": round(finish, 2),
        "generate_copies_s": round(generate, 2),
        "size_bytes": info["size_bytes"],
        "bytes_per_item": info["bytes_per_item"],
        "bytes_by_kind": bytes_by_kind(folder),
        "rss_before_build_mib": before,
        "build_peak_rss_mib": peak_rss_mib(),
    }


def new_item(base: Base, i: int, seed: int) -> NewItem:
    """Item ``i``'s row: a key, no picture, its photo's species as label and size, and a made-up
    sha256 (unique: the table deduplicates by it)."""
    photo = i % len(base)
    width, height = (int(v) for v in base.sizes[photo])
    return NewItem(f"copy-{i}", None, str(base.labels[photo]), f"{seed:08x}{i:056x}", width,
                   height)  # fmt: skip


def bytes_by_kind(folder: Path) -> dict[str, int]:
    kinds = {".grids.npy": "grids", ".vectors.npy": "vectors", ".faiss": "faiss"}
    out = {"grids": 0, "vectors": 0, "faiss": 0, "table": 0, "other": 0}
    for path in folder.rglob("*"):
        if path.is_file():
            kind = next((k for s, k in kinds.items() if path.name.endswith(s)), None)
            if kind is None:
                kind = "table" if path.name.startswith("items.sqlite") else "other"
            out[kind] += path.stat().st_size
    return out


# -- the coarse stage, approximate against exact -------------------------------------------------


class ExactGallery(Gallery):
    """The same index with its coarse stage done exactly: FAISS Flat over its stored vectors."""

    def __init__(self, index: GalleryIndex) -> None:
        super().__init__(index, None)
        self.flat = VectorIndex.create("Flat", index.manifest.dim)
        for start in range(0, index.count, 100_000):
            ids = index.ids[start : start + 100_000]
            self.flat.add(ids, index.vectors(ids))

    def search(
        self, queries: np.ndarray, k: int, where: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.flat.search(queries, k)


def coarse_check(folder: Path, model: EmbeddingNet, fp: str, queries: Embedding) -> dict[str, Any]:
    """Recall@100 of the index's coarse search against exact search, the share of queries whose
    final top 10 (the service's search) is unchanged at the model's w and at w = 1, and the
    coarse search's time per query, one query at a time, both ways."""
    start = time.perf_counter()
    index = GalleryIndex.open(folder, fp)
    try:
        approximate, exact = Gallery(index, None), ExactGallery(index)
        vectors = queries.vector.numpy()
        found, truth = approximate.search(vectors, RERANK_K)[1], exact.search(vectors, RERANK_K)[1]
        recall = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max((t >= 0).sum(), 1)
                  for f, t in zip(found, truth, strict=True)]  # fmt: skip
        out: dict[str, Any] = {
            "queries": len(queries),
            "factory": index.manifest.factory,
            "recall_at_100": round(float(np.mean(recall)), 4),
            "recall_at_100_min": round(float(np.min(recall)), 4),
            "coarse_ms_per_query": {
                "index": round(per_query_ms(approximate, vectors), 3),
                "exact": round(per_query_ms(exact, vectors), 3),
            },
        }
        weights = {"model_w": model.config.matching.structural_weight, "w_1": 1.0}
        for name, w in weights.items():
            matching = dataclasses.replace(model.config.matching, structural_weight=w)
            config = dataclasses.replace(model.config, matching=matching)
            out[f"top10_unchanged_{name}"] = {
                "w": w,
                **compare(approximate, exact, config, queries),
            }
    finally:
        index.close()
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def compare(
    approximate: Gallery, exact: ExactGallery, config: Any, queries: Embedding
) -> dict[str, Any]:
    """How many queries' final top 10 (the service's search, with ``config``'s weight) differ
    between the two coarse stages. The service's search reads the first ``depth`` candidates
    of the coarse stage (the re-ranked head and one past the page); a query whose ``depth``
    candidates are the same, in the same order, both ways gets the same answer, so only the
    others are searched both ways."""
    depth = max(K + 1, Retrieval(approximate, config, torch.device("cpu")).head(RERANK_K))
    vectors = queries.vector.numpy()
    found, truth = approximate.search(vectors, depth)[1], exact.search(vectors, depth)[1]
    differ = np.flatnonzero((found != truth).any(axis=1))
    same, overlap = np.ones(len(queries)), np.ones(len(queries))
    if len(differ):
        chosen = Embedding(queries.parts[differ], queries.vector[differ])
        pairs = zip(top(approximate, config, chosen), top(exact, config, chosen), strict=True)
        for q, (a, e) in zip(differ, pairs, strict=True):
            same[q] = a == e
            overlap[q] = len(set(a) & set(e)) / max(len(e), 1)
    return {
        "coarse_depth": depth,
        "queries_with_other_candidates": len(differ),
        "percent_same_order": round(100 * float(same.mean()), 2),
        "mean_overlap": round(float(overlap.mean()), 4),
    }


def per_query_ms(gallery: Gallery, vectors: np.ndarray) -> float:
    start = time.perf_counter()
    for row in vectors:
        gallery.search(row[None], RERANK_K)
    return 1e3 * (time.perf_counter() - start) / len(vectors)


def top(gallery: Gallery, config: Any, queries: Embedding) -> list[list[int]]:
    """Each query's final top-10 item ids by the service's search over ``gallery``."""
    retrieval = Retrieval(gallery, config, torch.device("cpu"))
    options = SearchOptions(k=K, rerank_k=RERANK_K, explain=False)
    geometry = geometry_of(500, 375, config.preprocessing)  # unused without explanations
    out = []
    for start in range(0, len(queries), QUERY_BATCH):
        batch = queries[start : start + QUERY_BATCH]
        job = SearchJob(batch, [geometry] * len(batch), options, StageTimer(Metrics()))
        for page in retrieval.batch([job])[0]:
            out.append([hit.item.id for hit in page.hits])
    return out


# -- serving ------------------------------------------------------------------------------------


def serve_and_load(
    folder: Path, checkpoint: Path | None, photos: list[bytes], requests: int
) -> dict[str, Any]:
    """``diml serve`` of ``folder``; /search from 1 and 16 clients; the server's memory."""
    settings = {"DIML_DEVICE": "cpu"}
    if checkpoint is not None:
        settings["DIML_CHECKPOINT"] = str(checkpoint)
    with running(folder, "auto", settings, timeout=1800) as server:
        url, pid = server.url, server.process.pid
        out: dict[str, Any] = {"items": server.items, "ready_s": server.ready_s,
                               "rss_ready_mib": rss_mib(pid)}  # fmt: skip
        send(url, photos, 1, 5)  # warm-up
        for clients in CLIENTS:
            load = send(url, photos, clients, requests)
            ms = sorted(1e3 * s for s in load.latencies)
            stages = {n: round(float(np.median([t.get(n, 0.0) for t in load.timings])), 2)
                      for n in ("coarse_search", "gather", "rerank", "explain")}  # fmt: skip
            out[f"clients_{clients}"] = {
                "requests": len(ms),
                "errors": len(load.errors),
                "p50_ms": round(percentile(ms, 0.50), 1),
                "p99_ms": round(percentile(ms, 0.99), 1),
                "requests_per_s": round(len(ms) / load.wall, 2),
                "server_stage_median_ms": stages,
                "load_average": round(os.getloadavg()[0], 2),
            }
        out["rss_after_load_mib"] = rss_mib(pid)
        out["rss_peak_mib"] = rss_mib(pid, "VmHWM")
        return out


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]


# -- memory and disk ----------------------------------------------------------------------------


def status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mib(pid: int | str, field: str = "VmRSS") -> float:
    return round(status_kib(pid, field) / 1024, 1)


def reset_peak_rss() -> None:
    """Start this process's peak RSS (VmHWM) afresh (Linux: ``clear_refs`` value 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    return rss_mib("self", "VmHWM")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def needs(n: int, per_item: float, dim: int, regions: int) -> tuple[int, int]:
    """(disk, memory) bytes that a size needs (see the module docstring)."""
    vectors = n * dim * 4
    grids = n * packed_dtype(regions, dim).itemsize
    return int(1.1 * n * per_item), max(3 * vectors, vectors + grids) + RESERVE_RAM


def refusal(n: int, per_item: float, dim: int, regions: int, cache: Path) -> str | None:
    """Why size ``n`` would not fit (None when it fits)."""
    disk, memory = needs(n, per_item, dim, regions)
    free = shutil.disk_usage(cache).free - RESERVE_DISK
    available = mem_available()
    if disk > free:
        kept = RESERVE_DISK // GiB
        return (
            f"needs about {disk / GiB:.1f} GiB of disk ({per_item:,.0f} bytes per item), "
            f"{free / GiB:.1f} GiB free in {cache} beyond the {kept} GiB kept free"
        )
    if memory > available:
        return (
            f"needs about {memory / GiB:.1f} GiB of memory (global vectors and part grids of "
            f"{n:,} items of D = {dim}), {available / GiB:.1f} GiB available"
        )
    return None


# -- the run ------------------------------------------------------------------------------------


def one_size(
    n: int, args: argparse.Namespace, model: EmbeddingNet, fp: str, base: Base, photos: list[bytes]
) -> dict[str, Any]:
    """Build (or reuse, with ``--keep``), check and serve a gallery of ``n`` copies."""
    row: dict[str, Any] = {"items": n}
    started = time.perf_counter()
    with gallery_folder(n, args, fp) as (folder, reused):
        stats_file = folder.with_name(folder.name + ".build.json")
        if reused:
            print(f"== {n:,} items: reusing {folder}", flush=True)
            row["build"] = {**json.loads(stats_file.read_text()), "reused": True}
        else:
            print(
                f"== {n:,} items: building {folder} ({default_factory(n, model.dim)})", flush=True
            )
            row["build"] = build(folder, model, fp, base, n, args.sigma, args.seed)
            if args.keep:
                stats_file.write_text(json.dumps(row["build"], indent=1) + "\n")
        print(f"   build: {json.dumps(row['build'])}", flush=True)
        queries, _ = held_out(base, args.queries, args.sigma, args.seed)
        row["coarse"] = coarse_check(folder, model, fp, queries)
        print(f"   coarse stage: {json.dumps(row['coarse'])}", flush=True)
        gc.collect()
        row["serve"] = serve_and_load(folder, args.checkpoint, photos, args.requests)
        print(f"   serve: {json.dumps(row['serve'])}", flush=True)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


@contextlib.contextmanager
def gallery_folder(n: int, args: argparse.Namespace, fp: str) -> Iterator[tuple[Path, bool]]:
    """The index folder of size ``n`` and whether it is reused: with ``--keep`` a named folder
    under ``--cache`` (reused when a complete one is there), else a temporary one, deleted."""
    args.cache.mkdir(parents=True, exist_ok=True)
    if not args.keep:
        folder = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=args.cache))
        try:
            yield folder / "index", False
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    folder = args.cache / f"index-{fp[:12]}-n{n}-sigma{args.sigma:g}-seed{args.seed}"
    stats = folder.with_name(folder.name + ".build.json")
    reused = has_index(folder) and stats.is_file()
    if reused:
        index = GalleryIndex.open(folder, fp)
        reused = index.count == n
        index.close()
    if not reused:
        shutil.rmtree(folder, ignore_errors=True)
        stats.unlink(missing_ok=True)
    yield folder, reused


def query_photos(cub: Path) -> list[bytes]:
    """The /search queries: 40 real photos spread over the species (as bench_service.py)."""
    return [p.read_bytes() for p in sorted((cub / "images").rglob("*.jpg"))[::17][:40]]


def describe(model: EmbeddingNet, checkpoint: Path | None) -> str:
    name = "default model (no training)" if checkpoint is None else f"checkpoint {checkpoint}"
    c = model.config
    return f"{name}: {c.backbone}, D = {model.dim}, {c.grid} x {c.grid} grid"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--cub", type=Path, default=REPO.parent / "shared/data/cub-dev")
    parser.add_argument("--checkpoint", type=Path, help="default: the training-free model")
    parser.add_argument("--cache", type=Path, default=REPO / "out/scale",
                        help="embeddings cache and index folders (default out/scale)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "out/scale/scale.json")
    parser.add_argument("--queries", type=int, default=200, help="held-out copies: coarse check")
    parser.add_argument("--requests", type=int, default=200, help="/search per client count")
    parser.add_argument("--sigma", type=float, default=0.1, help="noise length (see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true",
                        help="keep the index folders under --cache and reuse them")  # fmt: skip
    parser.add_argument("--plot", action="store_true", help="draw --png after the run")
    parser.add_argument("--plot-from", type=Path, nargs="+", metavar="JSON",
                        help="only draw --png from these results (one series each)")  # fmt: skip
    parser.add_argument("--png", type=Path, default=REPO / "docs/scale.png")
    args = parser.parse_args()
    if args.plot_from:
        plot([json.loads(p.read_text()) for p in args.plot_from], args.png)
        return
    results = run(args)
    if args.plot:
        plot([results], args.png)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    model = load_model(args.checkpoint)
    fp = fingerprint(model)
    base, embed_s = real_embeddings(model, fp, args.cub, args.cache)
    photos = query_photos(args.cub)
    regions, dim = model.config.grid**2, model.dim
    results: dict[str, Any] = {
        "model": {
            "description": describe(model, args.checkpoint),
            "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
            "fingerprint": fp,
            "dim": dim,
            "grid": model.config.grid,
            "structural_weight": model.config.matching.structural_weight,
        },
        "data": {
            "note": "gallery items and coarse-check queries are perturbed copies of real "
            "embeddings of the CUB photos, not embedded photos; /search queries are real photos",
            "cub": str(args.cub),
            "photos": len(base),
            "sigma": args.sigma,
            "seed": args.seed,
            "embedding_s": round(embed_s, 1),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "mem_total_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1
            ),
            "load_average_at_start": round(os.getloadavg()[0], 2),
        },
        "settings": {
            "k": K,
            "rerank_k": RERANK_K,
            "queries": args.queries,
            "requests": args.requests,
            "clients": list(CLIENTS),
        },
        "sizes": [],
    }
    print(f"{describe(model, args.checkpoint)}; {len(base)} real CUB embeddings; gallery items "
          f"are PERTURBED COPIES of them (sigma {args.sigma}, seed {args.seed})")  # fmt: skip
    per_item = float(stored_bytes(regions, dim) + 4 * dim + 600)  # until one is measured
    for n in sorted(set(args.sizes)):
        reason = refusal(n, per_item, dim, regions, args.cache)
        if reason is not None:
            print(f"== {n:,} items: SKIPPED: {reason}", flush=True)
            results["sizes"].append({"items": n, "skipped": reason})
        else:
            try:
                row = one_size(n, args, model, fp, base, photos)
                per_item = float(row["build"]["bytes_per_item"])  # measured from now on
            except Exception as e:
                traceback.print_exc()
                row = {"items": n, "error": f"{type(e).__name__}: {e}"}
            results["sizes"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"\nall numbers: {args.out}")
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{results['model']['description']}; gallery items are perturbed copies of "
          f"{results['data']['photos']} real CUB embeddings (sigma {results['data']['sigma']}); "
          f"/search k = {K}, rerank_k = {RERANK_K}, explanations on, real CUB photos as queries; "
          f"{results['machine']['cpus']} CPUs")  # fmt: skip
    w = results["model"]["structural_weight"]
    head = (f"{'items':>9} {'factory':>14} {'build s':>8} {'items/s':>8} {'B/item':>7} "
            f"{'build RSS MiB':>13} {'ready s':>7} {'server RSS MiB':>14} "
            f"{'1 client p50/p99 ms':>19} {'req/s':>6} {'16 clients p50/p99 ms':>21} "
            f"{'req/s':>6} {'recall@100':>10} {f'top10 same w={w:g}':>16} {'top10 same w=1':>14} "
            f"{'size s':>7}")  # fmt: skip
    print(head)
    for row in results["sizes"]:
        if "build" not in row or "serve" not in row:
            why = row.get("skipped") or row.get("error")
            print(f"{row['items']:>9,} {'skipped' if 'skipped' in row else 'failed'}: {why}")
            continue
        b, c, s = row["build"], row["coarse"], row["serve"]
        one, many = s["clients_1"], s["clients_16"]
        build_s = f"{b['build_s']:.1f}" + ("*" if b.get("reused") else "")
        print(f"{row['items']:>9,} {b['factory']:>14} {build_s:>8} {b['items_per_s']:>8,.0f} "
              f"{b['bytes_per_item']:>7,} {b['build_peak_rss_mib']:>13,.0f} {s['ready_s']:>7.1f} "
              f"{s['rss_after_load_mib']:>14,.0f} "
              f"{one['p50_ms']:>9.1f} / {one['p99_ms']:<7.1f} {one['requests_per_s']:>6.1f} "
              f"{many['p50_ms']:>11.1f} / {many['p99_ms']:<7.1f} {many['requests_per_s']:>6.1f} "
              f"{c['recall_at_100']:>10.4f} "
              f"{c['top10_unchanged_model_w']['percent_same_order']:>15.1f}% "
              f"{c['top10_unchanged_w_1']['percent_same_order']:>13.1f}% "
              f"{row['seconds']:>7.0f}")  # fmt: skip
    print(
        "(build s: writing segments and table, FAISS training and filling, manifest; "
        "* reused from --keep. top10 same: % of queries whose final top 10 is identical, same "
        "order, with the index's coarse stage and with exact search)"
    )


# -- the plot -----------------------------------------------------------------------------------


def plot(runs: list[dict[str, Any]], png: Path) -> None:
    """/search p50 (1 and 16 clients) and the server's RSS against N, one series per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so {png} was not drawn: install it "
              f"(`.venv/bin/pip install matplotlib`) and run with --plot-from JSON")  # fmt: skip
        return
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        rows = [r for r in run["sizes"] if "serve" in r]
        if not rows:
            continue
        n = [r["items"] for r in rows]
        checkpoint = run["model"].get("checkpoint")
        name = "default model" if checkpoint is None else "/".join(Path(checkpoint).parts[-2:])
        label = f"{name}, D = {run['model']['dim']}"
        for clients, style in zip(CLIENTS, ("o-", "s--"), strict=True):
            p50 = [r["serve"][f"clients_{clients}"]["p50_ms"] for r in rows]
            latency.plot(n, p50, style, label=f"{label}, {clients} client{'s' * (clients > 1)}")
        memory.plot(n, [r["serve"]["rss_after_load_mib"] for r in rows], "o-", label=label)
    latency.set(xscale="log", yscale="log", xlabel="gallery items", ylabel="/search p50 (ms)",
                title="/search latency (k = 10, rerank_k = 100, explained)")  # fmt: skip
    memory.set(xscale="log", xlabel="gallery items", ylabel="server RSS after the load (MiB)",
               title="server memory")  # fmt: skip
    memory.set_ylim(bottom=0)
    for ax in (latency, memory):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Perturbed copies of real CUB embeddings, this project's 2-core CPU machine",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
