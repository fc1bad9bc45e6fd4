"""Embedding at scale on Ray Data: ``diml index build --out qdrant://... --ray [ADDRESS]``.

Three stages, as clip-retrieval's reader / mapper / writer:

- read and decode: Ray tasks on CPU workers (:func:`index_builder.embedding.decode_source`,
  the same decoding and limits as a local build);
- embed: a pool of actors, each holding the model once (on a GPU each when ``device`` is CUDA),
  through the one embedding loop (:func:`index_builder.embedding.embed_decoded`);
- write: into a Qdrant server, a pool of writer actors (as many as embedding actors), each
  with the collection open, adds its batches as a local build does
  (:func:`index_builder.adding.add_embedded`: duplicates skipped and reported, a rerun passing
  over what it wrote), so that vectors and grids never travel through this process; only a
  line per image comes back for the report. A ``qdrant-local:`` folder can be opened by one
  process only: there, batches stream back to this process, which writes them
  (:func:`index_builder.qdrant_build.write_qdrant`).

Between stages a batch travels as Ray's numpy columns; each stage reads them back as the
records of :mod:`index_builder.records`.

Two writers adding the same bytes at the same moment both write the one point their content
names (ids come from the bytes); the report then names the key the collection kept and lists
the other as a duplicate, as a single writer would have.

Ray (``ray[data]``) is in the ``cluster`` extra; without ``address`` a local Ray starts on this
machine, with ``auto`` or ``ray://HOST:PORT`` an existing cluster is joined.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index_builder.adding import add_embedded
from index_builder.embedding import decode_source, embed_decoded, with_embedding
from index_builder.limits import DEFAULT_MAX_BYTES
from index_builder.location import QdrantLocation
from index_builder.qdrant_build import create_collection, write_qdrant
from index_builder.qdrant_collection import item_id
from index_builder.qdrant_index import QdrantIndex
from index_builder.records import Decoded, EmbeddedBatch, Report, Source
from model.checkpoint import fingerprint
from model.config import Preprocessing
from model.network import Embedding, EmbeddingNet

log = logging.getLogger(__name__)


def _decode(batch: dict[str, np.ndarray], spec: Preprocessing, max_bytes: int) -> dict[str, Any]:
    """The decode stage: sources (columns ``index``, ``path``, ``key``, ``label``) -> the same
    with their :class:`Decoded` columns and ``pixels`` (n, 3, crop, crop), zero where failed."""
    decoded = [decode_source(source, spec, max_bytes) for source in _sources(batch)]
    pixels = np.zeros((len(decoded), 3, spec.crop, spec.crop), dtype=np.float32)
    for i, d in enumerate(decoded):
        if d.pixels is not None:
            pixels[i] = d.pixels.numpy()
    return {
        **{k: batch[k] for k in ("index", "path", "key", "label")},
        "ok": np.array([not d.reason for d in decoded], dtype=bool),
        "sha256": np.array([d.sha256 for d in decoded], dtype=object),
        "reason": np.array([d.reason for d in decoded], dtype=object),
        "width": np.array([d.width for d in decoded]),
        "height": np.array([d.height for d in decoded]),
        "pixels": pixels,
    }


def _sources(batch: dict[str, np.ndarray]) -> list[Source]:
    rows = zip(batch["path"], batch["key"], batch["label"], strict=True)
    return [Source(Path(str(path)), str(key), str(label) or None) for path, key, label in rows]


def _decoded(batch: dict[str, np.ndarray]) -> list[Decoded]:
    """A batch's columns as :class:`Decoded` records, with their pixels while it has them."""
    given = batch.get("pixels")  # Ray may hand read-only arrays, which torch will not wrap
    pixels = None if given is None else torch.from_numpy(np.require(given, requirements="W"))
    columns = ("ok", "sha256", "width", "height", "reason")
    rows = zip(_sources(batch), *(batch[c] for c in columns), strict=True)
    return [
        Decoded(source, pixels[i] if ok and pixels is not None else None,
                str(sha), int(width), int(height), "" if ok else str(reason))
        for i, (source, ok, sha, width, height, reason) in enumerate(rows)
    ]  # fmt: skip


def _embedded(batch: dict[str, np.ndarray]) -> EmbeddedBatch:
    """An embedded batch's columns (zero vectors and grids where decoding failed) as the
    embedding loop gives one."""
    ok = batch["ok"].astype(bool)
    parts, vectors = (torch.from_numpy(batch[c][ok]) for c in ("grid", "vector"))
    return with_embedding(_decoded(batch), Embedding(parts, vectors) if ok.any() else None)


class _Embed:
    """A Ray actor: the model loaded once, embedding the decoded images of each batch."""

    def __init__(self, checkpoint: str | None, device: str, inference: str) -> None:
        from model import Embedder, load_model

        target = torch.device(device)
        model = load_model(Path(checkpoint) if checkpoint else None, device=target)
        self.embedder = Embedder(model, target, half=target.type == "cuda", runtime=inference)  # type: ignore[arg-type]
        self.shape = (model.config.grid**2, model.dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        embedded = embed_decoded(_decoded(batch), self.embedder.embed_pixels)
        ok = batch["ok"].astype(bool)
        vectors = np.zeros((len(ok), self.shape[1]), dtype=np.float32)
        grids = np.zeros((len(ok), *self.shape), dtype=np.float16)
        if embedded.decoded:
            vectors[ok], grids[ok] = embedded.vectors, embedded.grids
        out = {k: v for k, v in batch.items() if k != "pixels"}
        return {**out, "vector": vectors, "grid": grids}


class Write:
    """A Ray actor (the write stage): the collection at ``location`` opened once for writing,
    each embedded batch added to it; returns, per image, its outcome: ``added``, ``kept`` (a
    rerun: already there under its own key) or why it was skipped."""

    def __init__(self, location: QdrantLocation, fingerprint: str) -> None:
        self.index = QdrantIndex.open(location, fingerprint, writable=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        embedded = _embedded(batch)
        report = add_embedded(self.index, embedded.embedded(), resume=True)
        reasons = {s["path"]: s["reason"] for s in embedded.skipped() + report.skipped}
        added = set(report.ids)
        outcome = [
            reasons.get(str(path)) or ("added" if item_id(str(sha)) in added else "kept")
            for path, sha in zip(batch["path"], batch["sha256"], strict=True)
        ]
        return {"index": batch["index"], "sha256": batch["sha256"],
                "outcome": np.array(outcome, dtype=object)}  # fmt: skip


def settle(
    sources: Sequence[Source], rows: Iterable[tuple[int, str, str]], index: QdrantIndex
) -> Report:
    """The report of a build written by several writers, from each image's (position in
    ``sources``, sha256, outcome). Bytes that two writers added at once are one point in the
    collection: the key it kept counts as added, the other is reported as its duplicate."""
    report = Report()
    added: dict[str, list[int]] = {}
    for i, sha, outcome in rows:
        if outcome == "added":
            added.setdefault(sha, []).append(i)
        elif outcome != "kept":
            report.skipped.append({"path": str(sources[i].path), "reason": outcome})
    raced = {sha: found for sha, found in added.items() if len(found) > 1}
    kept = index.items([item_id(sha) for sha in raced])
    for sha, found in raced.items():
        key = kept[item_id(sha)].key
        report.skipped += [{"path": str(sources[i].path), "reason": f"duplicate bytes of {key}"}
                           for i in found if sources[i].key != key]  # fmt: skip
    report.indexed = len(added)
    report.skipped.sort(key=lambda s: s["path"])
    report.count = index.count
    return report


def _embedded_dataset(
    sources: Sequence[Source],
    model: EmbeddingNet,
    checkpoint: Path | None,
    device: str = "cpu",
    inference: str = "auto",
    batch_size: int = 32,
    max_bytes: int = DEFAULT_MAX_BYTES,
    address: str | None = None,
    actors: int = 1,
) -> Any:
    """The read, decode and embed stages as a Ray dataset (lazy: nothing runs yet)."""
    import ray

    # The writers run where Ray puts them: they get the collection's API key from this job.
    key = os.environ.get("DIML_QDRANT_API_KEY")
    runtime_env = {"env_vars": {"DIML_QDRANT_API_KEY": key}} if key else None
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR, runtime_env=runtime_env)  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = [{"index": i, "path": str(s.path), "key": s.key, "label": s.label or ""}
            for i, s in enumerate(sources)]  # fmt: skip
    decode = functools.partial(_decode, spec=model.config.preprocessing, max_bytes=max_bytes)
    decoded = ray.data.from_items(rows).map_batches(
        decode, batch_size=batch_size, batch_format="numpy"
    )
    return decoded.map_batches(
        _Embed,
        fn_constructor_kwargs={"checkpoint": str(checkpoint) if checkpoint else None,
                               "device": device, "inference": inference},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if device.startswith("cuda") else 0,
    )  # fmt: skip


def ray_batches(
    sources: Sequence[Source], model: EmbeddingNet, checkpoint: Path | None, **options: Any
) -> Iterator[EmbeddedBatch]:
    """Decode on Ray tasks, embed on Ray actors (options: those of :func:`_embedded_dataset`);
    yields batches as :func:`index_builder.embedding.embed_sources` does."""
    batch_size = options.get("batch_size", 32)
    embedded = _embedded_dataset(sources, model, checkpoint, **options)
    for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield _embedded(batch)


def build_with_ray(
    sources: Sequence[Source],
    location: QdrantLocation,
    model: EmbeddingNet,
    checkpoint: Path | None,
    writers: int | None = None,
    **options: Any,
) -> Report:
    """Index ``sources`` into a Qdrant collection, embedding on Ray (see the module).

    ``writers``: writer actors; 0, this process writes; None (the default), as many as the
    embedding actors for a server and 0 for a ``qdrant-local:`` folder, which one process at a
    time may open (1 writer works there too: this process waits for it to let go)."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"--ray needs Ray: pip install 'diml-retrieval[cluster]' ({e})") from e
    if writers is None:
        writers = 0 if location.path is not None else options.get("actors", 1)
    if writers < 0:
        raise ValueError(f"writers: give 0 or more, not {writers}")
    if location.path is not None and writers > 1:
        raise ValueError(f"{location} is opened by one process at a time: one writer at most")
    if writers == 0:
        return write_qdrant(location, model, ray_batches(sources, model, checkpoint, **options))
    started = time.perf_counter()
    create_collection(location, model).close()  # made (or checked) before any writer opens it
    batch_size, fp = options.get("batch_size", 32), fingerprint(model)
    embedded = _embedded_dataset(sources, model, checkpoint, **options)
    written = embedded.map_batches(
        Write, fn_constructor_kwargs={"location": location, "fingerprint": fp},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=writers),
    )  # fmt: skip
    rows = [
        (int(i), str(sha), str(outcome))
        for batch in written.iter_batches(batch_size=batch_size, batch_format="numpy")
        for i, sha, outcome in zip(batch["index"], batch["sha256"], batch["outcome"], strict=True)
    ]  # fmt: skip
    index = _reopen(location, fp)
    try:
        report = settle(sources, rows, index)
    finally:
        index.close()
    report.seconds = time.perf_counter() - started
    return report


def _reopen(location: QdrantLocation, fp: str, wait_s: float = 30.0) -> QdrantIndex:
    """Open the collection the writers wrote; a local folder only once the writer actor, which
    Ray stops when the data set is done, has let go of it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return QdrantIndex.open(location, fp)
        except RuntimeError as e:  # qdrant-client: "... already accessed by another instance"
            if location.path is None or time.monotonic() > deadline:
                raise
            log.debug("waiting for the writer to close %s: %s", location, e)
            time.sleep(0.2)
