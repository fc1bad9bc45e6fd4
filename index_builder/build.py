"""Gallery in, index out: scan, decode in parallel workers, embed in batches, write segments.

A build works in ``INDEX_DIR/.building``: every ``segment_size`` items it writes a segment and
commits its rows (and the files it skipped, with the reason), so an interrupted build resumes
where it stopped when run again with the same inputs and model. At the end it trains and fills
the FAISS index, writes the manifest and swaps the new version in atomically; until then the
previous version stays live.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from index_builder.files import crashpoint, writer_lock
from index_builder.gallery import (
    BUILDING,
    SNAPSHOT_META,
    SNAPSHOT_SEGMENT_META,
    GalleryIndex,
)
from index_builder.gallery import publish as publish_version
from index_builder.limits import text_problem
from index_builder.location import Location, QdrantLocation, parse_location
from index_builder.manifest import Manifest
from index_builder.opening import AnyIndex
from index_builder.qdrant_index import QdrantIndex
from index_builder.segments import SegmentStore
from index_builder.table import ItemTable, NewItem
from index_builder.vector_index import VectorIndex, default_factory
from model import Embedder, ImageLoadError, fingerprint, load_for_model
from model.config import Preprocessing
from model.network import EmbeddingNet

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
BUILD_INFO = "build.json"


@dataclass(frozen=True)
class Source:
    """An image to index: where its bytes are, the key users know it by, an optional label."""

    path: Path
    key: str
    label: str | None = None

    def __post_init__(self) -> None:
        if (problem := text_problem(self.key, self.label)) is not None:
            raise ValueError(f"{self.path}: {problem}")


@dataclass
class Report:
    """What a build or an add did."""

    indexed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    count: int = 0
    ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        rate = self.indexed / self.seconds if self.seconds else None
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(rate, 2) if rate else None,
            "count": self.count,
        }


class SourceListError(ValueError):
    """A --list file is missing or malformed; the message names the file, line and format."""


def scan_folder(root: Path) -> list[Source]:
    """Every non-hidden file under ``root``, sorted; key = relative path, label = first folder.
    Paths are made absolute: the index records where to find each file from anywhere."""
    if not root.is_dir():
        raise SourceListError(f"{root}: no such folder of images")
    root = root.absolute()
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            sources.append(Source(path, rel.as_posix(), label))
    return sources


def read_list(csv_path: Path) -> list[Source]:
    """A CSV with a header naming ``path`` and optionally ``key`` and ``label``; relative paths
    are relative to the CSV's folder; the key defaults to the path as written."""
    try:
        text = csv_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceListError(f"{csv_path}: cannot read the list ({e})") from e
    rows = csv.DictReader(text.splitlines())
    if rows.fieldnames is None or "path" not in rows.fieldnames:
        raise SourceListError(
            f"{csv_path}: the first line must be a CSV header with a 'path' column "
            "(and optionally 'key' and 'label'), e.g. 'path,key,label'"
        )
    sources = []
    for row in rows:
        raw = (row.get("path") or "").strip()
        if not raw:
            raise SourceListError(f"{csv_path}:{rows.line_num}: empty path")
        path = Path(raw) if Path(raw).is_absolute() else csv_path.parent.absolute() / raw
        key = (row.get("key") or "").strip() or raw
        try:
            sources.append(Source(path, key, (row.get("label") or "").strip() or None))
        except ValueError as e:
            raise SourceListError(f"{csv_path}:{rows.line_num}: {e}") from e
    return sources


class _Decode(Dataset[dict[str, Any]]):
    """Reads, hashes, decodes and preprocesses one source; failures come back as a reason."""

    def __init__(self, sources: Sequence[Source], model: EmbeddingNet, max_bytes: int) -> None:
        self.sources = sources
        self.spec = model.config.preprocessing
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, **decode_source(self.sources[i].path, self.spec, self.max_bytes)}


def decode_source(path: Path, spec: Preprocessing, max_bytes: int) -> dict[str, Any]:
    """Read, hash, decode and preprocess one file: ``pixels`` (None on failure, with a
    ``reason``), ``sha256`` of the bytes, original ``size``."""
    out: dict[str, Any] = {"pixels": None, "sha256": "", "reason": "", "size": None}
    try:
        size = path.stat().st_size
        if size > max_bytes:
            out["reason"] = f"too large: {size:,} bytes (limit {max_bytes:,})"
            return out
        data = path.read_bytes()
    except OSError as e:
        out["reason"] = f"unreadable: {e.strerror or e}"
        return out
    out["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        loaded = load_for_model(data, spec)
        out["pixels"] = loaded.pixels
        out["size"] = (loaded.geometry.width, loaded.geometry.height)
    except ImageLoadError as e:
        out["reason"] = e.reason
    return out


def _collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def embed_sources(
    sources: Sequence[Source],
    embedder: Embedder,
    batch_size: int = 32,
    workers: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> Iterator[tuple[list[dict[str, Any]], np.ndarray, np.ndarray]]:
    """Decode in ``workers`` processes and embed in batches.

    Yields (records, vectors (b, D) float32, grids (b, R, D) float16) per batch; ``records``
    has one dict per source of the batch, with ``pixels`` None and a ``reason`` for failures;
    vectors and grids hold the successful ones in order.
    """
    loader = DataLoader(
        _Decode(sources, embedder.model, max_bytes),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    bar = tqdm(total=len(sources), unit="img", disable=not progress, smoothing=0.1)
    try:
        for records in loader:
            good = [r["pixels"] for r in records if r["pixels"] is not None]
            if good:
                emb = embedder.embed_pixels(torch.stack(good))
                vectors = emb.vector.float().cpu().numpy()
                grids = emb.parts.half().cpu().numpy()
            else:
                vectors = grids = np.zeros((0,), dtype=np.float32)
            bar.update(len(records))
            yield records, vectors, grids
    finally:
        bar.close()


def default_workers(device: torch.device) -> int:
    """Decoding processes: on a GPU, enough to feed it; on the CPU, where the backbone already
    uses every core, only the cores beyond four (measured on 2 cores: in-process decoding
    reached 98% of the forward-only rate, two worker processes 65%)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return max(0, (cores - 4) // 4)


def build_index(
    sources: Sequence[Source],
    out: str | Path | Location,
    embedder: Embedder,
    factory: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    segment_size: int = 2048,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> Report:
    """Index ``sources`` into ``out``: a folder (a new version, swapped in at the end) or a
    Qdrant collection (points upserted batch by batch). Resumable either way."""
    started = time.perf_counter()
    model = embedder.model
    fp = fingerprint(model)
    workers = default_workers(embedder.device) if workers is None else workers
    location = parse_location(out)
    if isinstance(location, QdrantLocation):
        return _build_qdrant(sources, location, embedder, batch_size, workers, max_bytes, progress)
    out = location
    with writer_lock(out):
        work = out / BUILDING
        table = _resume_or_start(work, fp, factory, sources)
        store = SegmentStore(work)
        store.remove_orphans({s.id for s in table.segments()})
        seen = table.seen_paths()
        todo = [s for s in sources if str(s.path) not in seen]
        known = table.keys_by_sha256()  # bytes already indexed -> their key
        report = Report()
        pending: list[tuple[NewItem, np.ndarray, np.ndarray]] = []
        skipped: list[tuple[str, str]] = []

        def flush() -> None:
            if not pending and not skipped:
                return
            if pending:
                vectors = np.stack([p[1] for p in pending])
                grids = np.stack([p[2] for p in pending])
                info = store.write(table.next_segment(), vectors, grids)
                crashpoint("build:segment-written")
                table.commit_segment(info, table.next_id(), [p[0] for p in pending], skipped)
                crashpoint("build:segment-committed")
            else:
                table.record_skipped(skipped)
            report.indexed += len(pending)
            pending.clear()
            skipped.clear()

        batches = embed_sources(todo, embedder, batch_size, workers, max_bytes, progress)
        for records, vectors, grids in batches:
            row = 0
            for record in records:
                source = todo[record["index"]]
                if record["pixels"] is None:
                    skipped.append((str(source.path), record["reason"]))
                    continue
                sha = record["sha256"]
                if sha in known:
                    skipped.append((str(source.path), f"duplicate bytes of {known[sha]}"))
                else:
                    item = NewItem(source.key, str(source.path), source.label, sha, *record["size"])
                    pending.append((item, vectors[row], grids[row]))
                    known[sha] = source.key
                    if len(pending) >= segment_size:
                        flush()
                row += 1
        flush()
        _finish(work, table, store, model, fp, factory)
        table.close()
        publish_version(out, work)
    index = GalleryIndex.open(out)
    report.count = index.count
    report.skipped = [{"path": p, "reason": r} for p, r in index.table.skipped()]
    index.close()
    report.seconds = time.perf_counter() - started
    return report


def _build_qdrant(
    sources: Sequence[Source],
    location: QdrantLocation,
    embedder: Embedder,
    batch_size: int,
    workers: int,
    max_bytes: int,
    progress: bool,
) -> Report:
    batches = embed_sources(sources, embedder, batch_size, workers, max_bytes, progress)
    return write_qdrant(sources, location, embedder.model, batches)


def write_qdrant(
    sources: Sequence[Source],
    location: QdrantLocation,
    model: EmbeddingNet,
    batches: Iterator[tuple[list[dict[str, Any]], np.ndarray, np.ndarray]],
) -> Report:
    """Upsert embedded batches (as :func:`embed_sources` yields them, from this process or
    from Ray) into a collection made for ``model``. Point ids come from the bytes, so a rerun
    after a crash writes the same points again: an image already there under its own key is
    neither added nor reported, one whose bytes another item holds is skipped as a duplicate."""
    started = time.perf_counter()
    index = create_collection(location, model)
    report = Report()
    try:
        for records, vectors, grids in batches:
            embedded, failed = embedded_batch(sources, records, vectors, grids)
            report.skipped += failed
            part = add_embedded(index, embedded, resume=True)
            report.indexed += part.indexed
            report.skipped += part.skipped
        report.count = index.count
    finally:
        index.close()
    report.seconds = time.perf_counter() - started
    return report


def create_collection(location: QdrantLocation, model: EmbeddingNet) -> QdrantIndex:
    """The collection at ``location`` for ``model``'s embeddings, opened for writing: made
    when missing, reopened (a build resumed) when made for the same model."""
    config = model.config
    manifest = Manifest(
        fingerprint=fingerprint(model), backbone=config.backbone, grid=config.grid,
        dim=model.dim, factory="qdrant", count=0, model_config=config.to_dict(),
    )  # fmt: skip
    return QdrantIndex.create(location, manifest)


def _resume_or_start(
    work: Path, fp: str, factory: str | None, sources: Sequence[Source]
) -> ItemTable:
    """Reopen an interrupted build with the same model, factory and sources; else start anew."""
    digest = hashlib.sha256("\n".join(sorted(str(s.path) for s in sources)).encode()).hexdigest()
    info = {"fingerprint": fp, "factory": factory, "sources": digest}
    previous = work / BUILD_INFO
    if work.exists():
        try:
            same = json.loads(previous.read_text()) == info
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            log.info("resuming the interrupted build in %s", work)
        else:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not previous.exists():
        previous.write_text(json.dumps(info))
    return ItemTable(work)


def _finish(
    work: Path,
    table: ItemTable,
    store: SegmentStore,
    model: EmbeddingNet,
    fp: str,
    factory: str | None,
) -> None:
    """Train and fill the FAISS index from the segments, write snapshot and manifest."""
    ids, segments, rows = table.locations()
    vectors = store.gather(segments, rows, grids=False)
    chosen = factory or default_factory(len(ids))
    index = VectorIndex.create(chosen, model.dim)
    if index.needs_training:
        if len(ids) == 0:
            raise ValueError(f"{chosen} needs training vectors but no image could be indexed")
        rng = np.random.default_rng(0)
        sample = rng.choice(len(ids), size=index.training_size(len(ids)), replace=False)
        try:
            index.train(vectors[np.sort(sample)])
        except RuntimeError as e:
            raise ValueError(
                f"cannot train {chosen} on {len(ids)} vectors ({e}); use --factory Flat for a "
                "gallery this small, or fewer IVF lists"
            ) from e
    index.add(ids, vectors)
    last = table.next_segment() - 1
    name = f"index-{last:06d}.faiss"
    index.write(work / name)
    table.set_meta(SNAPSHOT_META, name)
    table.set_meta(SNAPSHOT_SEGMENT_META, str(last))
    config = model.config
    Manifest(
        fingerprint=fp,
        backbone=config.backbone,
        grid=config.grid,
        dim=model.dim,
        factory=chosen,
        count=len(ids),
        model_config=config.to_dict(),
    ).write(work)
    (work / BUILD_INFO).unlink(missing_ok=True)


@dataclass(frozen=True)
class Embedded:
    """An image decoded and embedded, ready to add: its source, bytes' sha256, original size,
    global vector (D,) float32 and part grid (R, D)."""

    source: Source
    sha256: str
    width: int
    height: int
    vector: np.ndarray
    grid: np.ndarray


def add_images(
    index: AnyIndex,
    sources: Sequence[Source],
    embedder: Embedder,
    batch_size: int = 32,
    workers: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Report:
    """Decode, embed and add ``sources`` to ``index`` (opened for writing) in one all-or-nothing
    step; unreadable files, non-images and bytes already in the index are skipped and reported."""
    started = time.perf_counter()
    index.check_model(fingerprint(embedder.model))
    skipped: list[dict[str, str]] = []
    embedded: list[Embedded] = []
    for records, vecs, grds in embed_sources(sources, embedder, batch_size, workers, max_bytes):
        good, failed = embedded_batch(sources, records, vecs, grds)
        embedded += good
        skipped += failed
    report = add_embedded(index, embedded)
    report.skipped = skipped + report.skipped
    report.seconds = time.perf_counter() - started
    return report


def embedded_batch(
    sources: Sequence[Source] | Mapping[int, Source],
    records: list[dict[str, Any]],
    vectors: np.ndarray,
    grids: np.ndarray,
) -> tuple[list[Embedded], list[dict[str, str]]]:
    """One batch of :func:`embed_sources` as Embedded images and the files that failed."""
    embedded, failed, row = [], [], 0
    for record in records:
        source = sources[record["index"]]
        if record["pixels"] is None:
            failed.append({"path": str(source.path), "reason": record["reason"]})
            continue
        width, height = record["size"]
        embedded.append(Embedded(source, record["sha256"], width, height, vectors[row], grids[row]))
        row += 1
    return embedded, failed


def add_embedded(index: AnyIndex, embedded: Sequence[Embedded], resume: bool = False) -> Report:
    """Add embedded images to ``index`` in one all-or-nothing step (the only part of an add that
    needs the index to itself). Bytes already in the index, or earlier in ``embedded``, are
    skipped and reported; ``Report.ids`` are the new items' ids in order. ``resume``: an image
    already in the index under its own key (a rerun of a build) is passed over unreported."""
    report = Report()
    known = index.keys_by_sha256(e.sha256 for e in embedded)
    fresh: list[Embedded] = []
    for e in embedded:
        if resume and known.get(e.sha256) == e.source.key:
            continue
        if e.sha256 in known:
            reason = f"duplicate bytes of {known[e.sha256]}"
            report.skipped.append({"path": str(e.source.path), "reason": reason})
            continue
        known[e.sha256] = e.source.key
        fresh.append(e)
    if fresh:
        items = [
            NewItem(e.source.key, str(e.source.path), e.source.label, e.sha256, e.width, e.height)
            for e in fresh
        ]
        vectors = np.stack([e.vector for e in fresh]).astype(np.float32, copy=False)
        report.ids = index.add(items, vectors, np.stack([e.grid for e in fresh]))
    report.indexed = len(fresh)
    report.count = index.count
    return report
