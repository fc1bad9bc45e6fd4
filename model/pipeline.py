"""From pictures to embeddings and explanations: the glue every entry point shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from model.config import ModelConfig
from model.explain import Explanation, explain
from model.images import ImageGeometry, preprocess
from model.matching import match_pairs
from model.network import Embedding, EmbeddingNet


class Embedder:
    """Runs ``model`` on decoded RGB images, in batches, on ``device``.

    ``half`` runs the backbone in fp16 autocast on CUDA; parts, vectors and matching stay fp32.
    """

    def __init__(
        self, model: EmbeddingNet, device: torch.device | str = "cpu", half: bool = False
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.half = half

    def embed(self, images: Sequence[Image.Image]) -> tuple[Embedding, list[ImageGeometry]]:
        """images: N RGB pictures -> Embedding (parts (N, R, D), vector (N, D)), N geometries."""
        if not images:
            raise ValueError("embed needs at least one image")
        spec = self.model.config.preprocessing
        prepared = [preprocess(image, spec) for image in images]
        pixels = torch.stack([p for p, _ in prepared]).to(self.device, non_blocking=True)
        return self.embed_pixels(pixels), [g for _, g in prepared]

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> Embedding:
        """pixels: (N, 3, crop, crop), already normalised -> Embedding."""
        use_half = self.half and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=use_half):
            embedding: Embedding = self.model(pixels.to(self.device))
        return embedding

    def explain(self, query: Image.Image, result: Image.Image, top: int = 5) -> Explanation:
        """Embed both pictures and explain how ``result`` matches ``query``."""
        embedding, (gq, gr) = self.embed([query, result])
        return explain_embeddings(embedding[0], gq, embedding[1], gr, self.model.config, top)


def explain_embeddings(
    a: Embedding,
    a_geometry: ImageGeometry,
    b: Embedding,
    b_geometry: ImageGeometry,
    config: ModelConfig,
    top: int = 5,
) -> Explanation:
    """How one embedded image ``b`` matches another ``a`` (each of length 1), with the grid and
    matching settings of the model ``config`` that made them."""
    with torch.inference_mode():
        match = match_pairs(a, b, config.matching)
    return explain(match, a_geometry, b_geometry, config.grid, config.matching, top=top)
