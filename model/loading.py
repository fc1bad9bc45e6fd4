"""Labelled image sets -> pixels and geometry rows, in batches, and their embeddings.

The one loop that embeds a labelled set (evaluation, calibration, training's validation) goes
through :class:`~model.pipeline.Embedder`, as indexing does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from model.config import Preprocessing
from model.datasets import Record
from model.decoding import load_image
from model.network import Embedding, EmbeddingNet
from model.pipeline import Embedder
from model.preprocessing import geometry_of, load_for_model
from model.quantization import round_trip
from model.runtime import Runtime


class ImageFiles(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Records -> (pixels (3, crop, crop), geometry row (5,): :meth:`ImageGeometry.row`).

    ``transform`` (a PIL image -> pixels) replaces the test-time preprocessing when given
    (training augmentations); the geometry is then that of the test-time crop.
    """

    def __init__(
        self,
        records: Sequence[Record],
        spec: Preprocessing,
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.records = records
        self.spec = spec
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.records[index].path  # errors name the file
        if self.transform is None:
            loaded = load_for_model(path, self.spec, max_aspect=None)
            pixels, g = loaded.pixels, loaded.geometry
        else:
            image = load_image(path)
            pixels, g = self.transform(image), geometry_of(image.width, image.height, self.spec)
        return pixels, g.row()


def batches(
    records: Sequence[Record], spec: Preprocessing, batch_size: int, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded batches of ``records`` at test-time preprocessing, in order."""
    yield from DataLoader(ImageFiles(records, spec), batch_size=batch_size, num_workers=workers)


def records_embedder(
    model: EmbeddingNet, device: torch.device, runtime: Runtime = "torch"
) -> Embedder:
    """The :class:`~model.pipeline.Embedder` that :func:`embed_records` runs ``model`` with:
    fp16 autocast on CUDA."""
    return Embedder(model, device, half=device.type == "cuda", runtime=runtime)


@torch.inference_mode()
def embed_records(
    model: EmbeddingNet,
    records: Sequence[Record],
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    runtime: Runtime = "torch",
    embedder: Embedder | None = None,
    stored: bool = True,
) -> tuple[Embedding, torch.Tensor]:
    """Embed every record at test-time preprocessing -> (Embedding on CPU, geometry rows (N, 5)).

    Parts are kept as the index stores them (int8 and a scale per part, read back as float16:
    :mod:`model.quantization`), so what is evaluated is what is served; ``stored=False`` keeps
    them in float16 (a study of storage starts from those).
    ``runtime``: the :class:`~model.pipeline.Embedder`'s (``torch`` for a model in training);
    ``embedder``: one already made by :func:`records_embedder` (``runtime`` is then its own).
    """
    embedder = embedder or records_embedder(model, device, runtime)
    parts, vectors, rows = [], [], []
    for pixels, geometry in batches(records, model.config.preprocessing, batch_size, workers):
        embedding = embedder.embed_pixels(pixels)
        found = embedding.parts.half().cpu()  # as an index receives them, then stores them
        parts.append(torch.from_numpy(round_trip(found.numpy())) if stored else found)
        vectors.append(embedding.vector.float().cpu())
        rows.append(geometry)
        if progress is not None:
            progress(len(pixels))
    return Embedding(torch.cat(parts), torch.cat(vectors)), torch.cat(rows)
