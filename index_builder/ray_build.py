"""Embedding at scale on Ray Data: ``diml index build --out qdrant://... --ray [ADDRESS]``.

Three stages, as clip-retrieval's reader / mapper / writer:

- read and decode: Ray tasks on CPU workers (:func:`index_builder.build.decode_source`, the
  same decoding and limits as a local build);
- embed: a pool of actors, each holding the model once (on a GPU each when ``device`` is CUDA),
  through :class:`model.pipeline.Embedder`, the one embedding loop;
- write: batches stream back to this process, which upserts them into the Qdrant collection
  (:func:`index_builder.build.write_qdrant`: dedup, skip report, resumable).

Ray (``ray[data]``) is in the ``cluster`` extra; without ``address`` a local Ray starts on this
machine, with ``auto`` or ``ray://HOST:PORT`` an existing cluster is joined.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.build import Report, Source, decode_source, write_qdrant
from index_builder.location import QdrantLocation
from model.config import Preprocessing
from model.network import EmbeddingNet


def _decode(batch: dict[str, np.ndarray], spec: Preprocessing, max_bytes: int) -> dict[str, Any]:
    rows = [decode_source(Path(p), spec, max_bytes) for p in batch["path"]]
    crop = spec.crop
    pixels = np.zeros((len(rows), 3, crop, crop), dtype=np.float32)
    for i, row in enumerate(rows):
        if row["pixels"] is not None:
            pixels[i] = row["pixels"].numpy()
    return {
        "index": batch["index"],
        "ok": np.array([r["pixels"] is not None for r in rows]),
        "sha256": np.array([r["sha256"] for r in rows], dtype=object),
        "reason": np.array([r["reason"] for r in rows], dtype=object),
        "width": np.array([r["size"][0] if r["size"] else 0 for r in rows]),
        "height": np.array([r["size"][1] if r["size"] else 0 for r in rows]),
        "pixels": pixels,
    }


class _Embed:
    """A Ray actor: the model loaded once, embedding the decoded images of each batch."""

    def __init__(self, checkpoint: str | None, device: str, inference: str) -> None:
        import torch

        from model import Embedder, load_model

        self.torch = torch
        target = torch.device(device)
        model = load_model(Path(checkpoint) if checkpoint else None, device=target)
        self.embedder = Embedder(model, target, half=target.type == "cuda", runtime=inference)  # type: ignore[arg-type]
        self.shape = (model.config.grid**2, model.dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = batch["ok"].astype(bool)
        vectors = np.zeros((len(ok), self.shape[1]), dtype=np.float32)
        grids = np.zeros((len(ok), *self.shape), dtype=np.float16)
        if ok.any():
            embedding = self.embedder.embed_pixels(self.torch.from_numpy(batch["pixels"][ok]))
            vectors[ok] = embedding.vector.float().cpu().numpy()
            grids[ok] = embedding.parts.half().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        return {**out, "vector": vectors, "grid": grids}


def ray_batches(
    sources: Sequence[Source],
    model: EmbeddingNet,
    checkpoint: Path | None,
    device: str = "cpu",
    inference: str = "auto",
    batch_size: int = 32,
    max_bytes: int = 50 * 1024 * 1024,
    address: str | None = None,
    actors: int = 1,
) -> Iterator[tuple[list[dict[str, Any]], np.ndarray, np.ndarray]]:
    """Decode on Ray tasks, embed on ``actors`` Ray actors; yields batches as
    :func:`index_builder.build.embed_sources` does."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR)  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = [{"index": i, "path": str(s.path)} for i, s in enumerate(sources)]
    decode = functools.partial(_decode, spec=model.config.preprocessing, max_bytes=max_bytes)
    decoded = ray.data.from_items(rows).map_batches(
        decode, batch_size=batch_size, batch_format="numpy"
    )
    embedded = decoded.map_batches(
        _Embed,
        fn_constructor_kwargs={"checkpoint": str(checkpoint) if checkpoint else None,
                               "device": device, "inference": inference},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if device.startswith("cuda") else 0,
    )  # fmt: skip
    for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
        ok = batch["ok"].astype(bool)
        records = [
            {"index": int(i), "pixels": True if good else None, "sha256": str(sha),
             "reason": str(reason), "size": (int(w), int(h))}
            for i, good, sha, reason, w, h in zip(batch["index"], ok, batch["sha256"],
                                                  batch["reason"], batch["width"],
                                                  batch["height"], strict=True)
        ]  # fmt: skip
        yield records, batch["vector"][ok], batch["grid"][ok]


def build_with_ray(
    sources: Sequence[Source],
    location: QdrantLocation,
    model: EmbeddingNet,
    checkpoint: Path | None,
    **options: Any,
) -> Report:
    """Index ``sources`` into a Qdrant collection, embedding on Ray (see the module)."""
    try:
        import ray  # noqa: F401  (known missing before the collection is made)
    except ImportError as e:
        raise ValueError(f"--ray needs Ray: pip install 'diml-retrieval[cluster]' ({e})") from e
    return write_qdrant(
        sources, location, model, ray_batches(sources, model, checkpoint, **options)
    )
