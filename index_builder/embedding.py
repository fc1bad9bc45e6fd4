"""Images to index -> their embeddings: the one embedding loop of every indexing path.

:func:`decode_source` reads, hashes and decodes one :class:`~index_builder.records.Source`
(bounded and hostile-safe: :func:`model.preprocessing.load_for_model`); :func:`embed_decoded`
embeds a batch of them and :func:`with_embedding` turns the embedding into the records and
arrays an index stores. A local build or add runs them through :func:`embed_sources` (decoding
in worker processes); a build on Ray decodes in its tasks and runs :func:`embed_decoded` in its
actors (:mod:`index_builder.ray_build`); the service, whose device has one batching owner,
embeds uploads through that owner and keeps them with :func:`with_embedding`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from index_builder.limits import DEFAULT_MAX_BYTES
from index_builder.records import Decoded, EmbeddedBatch, Source
from model import Embedder, ImageLoadError, load_for_model
from model.config import Preprocessing
from model.network import Embedding

# pixels (n, 3, crop, crop) -> their Embedding: Embedder.embed_pixels, or the service's batcher
EmbedPixels = Callable[[torch.Tensor], Embedding]


def decode_source(
    source: Source, spec: Preprocessing, max_bytes: int = DEFAULT_MAX_BYTES
) -> Decoded:
    """Read, hash, decode and preprocess one file; a failure comes back with its reason."""
    try:
        size = source.path.stat().st_size
        if size > max_bytes:
            return Decoded(source, reason=f"too large: {size:,} bytes (limit {max_bytes:,})")
        data = source.path.read_bytes()
    except OSError as e:
        return Decoded(source, reason=f"unreadable: {e.strerror or e}")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        loaded = load_for_model(data, spec)
    except ImageLoadError as e:
        return Decoded(source, sha256=sha256, reason=e.reason)
    geometry = loaded.geometry
    return Decoded(source, loaded.pixels, sha256, geometry.width, geometry.height)


def with_embedding(decoded: Sequence[Decoded], embedding: Embedding | None) -> EmbeddedBatch:
    """``decoded`` with the ``embedding`` of those that decoded (n rows, in their order; None
    when none did) -> the batch as an index stores it: vectors (n, D) float32 and grids
    (n, R, D) float16, on the CPU."""
    good = [d for d in decoded if not d.reason]
    failed = [d for d in decoded if d.reason]
    if embedding is None:
        if good:
            raise ValueError(f"{len(good)} decoded images need their embedding")
        empty = np.zeros((0,), dtype=np.float32)
        return EmbeddedBatch([], empty, empty.astype(np.float16), failed)
    if len(embedding.vector) != len(good):
        raise ValueError(f"{len(good)} decoded images, but an embedding of {len(embedding.vector)}")
    vectors = embedding.vector.float().cpu().numpy()
    grids = embedding.parts.half().cpu().numpy()
    return EmbeddedBatch(good, vectors, grids, failed)


def embed_decoded(decoded: Sequence[Decoded], embed: EmbedPixels) -> EmbeddedBatch:
    """The embedding loop's step: the sources of one batch that decoded, embedded together by
    ``embed`` (pixels (n, 3, crop, crop) -> Embedding) and kept as :func:`with_embedding` says."""
    pixels = [p for d in decoded if not d.reason and (p := d.pixels) is not None]
    if len(pixels) != sum(not d.reason for d in decoded):
        raise ValueError("a decoded source without its pixels cannot be embedded")
    return with_embedding(decoded, embed(torch.stack(pixels)) if pixels else None)


class _Decode(Dataset[Decoded]):
    """:func:`decode_source` for a DataLoader's workers."""

    def __init__(self, sources: Sequence[Source], spec: Preprocessing, max_bytes: int) -> None:
        self.sources, self.spec, self.max_bytes = sources, spec, max_bytes

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Decoded:
        return decode_source(self.sources[i], self.spec, self.max_bytes)


def _as_list(batch: list[Decoded]) -> list[Decoded]:
    return batch


def embed_sources(
    sources: Sequence[Source],
    embedder: Embedder,
    batch_size: int = 32,
    workers: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> Iterator[EmbeddedBatch]:
    """Decode in ``workers`` processes (0: in this one) and embed in batches of ``batch_size``,
    in the order of ``sources``."""
    spec = embedder.model.config.preprocessing
    loader = DataLoader(
        _Decode(sources, spec, max_bytes),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_as_list,
        persistent_workers=False,
    )
    bar = tqdm(total=len(sources), unit="img", disable=not progress, smoothing=0.1)
    try:
        for decoded in loader:
            batch = embed_decoded(decoded, embedder.embed_pixels)
            bar.update(len(decoded))
            yield batch
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
