"""From pictures to embeddings and explanations: the glue every entry point shares."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image

from model.checkpoint import fingerprint
from model.config import ModelConfig
from model.explain import Explanation, bases_of, explain
from model.matching import match_pairs
from model.network import Embedding, EmbeddingNet
from model.preprocessing import ImageGeometry, preprocess
from model.runtime import OnnxBackbone, Runtime, RuntimeUnavailableError, choose

log = logging.getLogger(__name__)


class Embedder:
    """Runs ``model`` on decoded RGB images, in batches, on ``device``: the one embedding loop.

    ``half`` runs the backbone in fp16 autocast on CUDA; parts, vectors and matching stay fp32.
    ``runtime`` (:mod:`model.runtime`): ``auto`` runs the backbone through ONNX Runtime on the
    CPU when it is installed and PyTorch otherwise; ``onnx`` asks for ONNX Runtime, ``torch``
    for PyTorch. ONNX Runtime takes the backbone's weights as they are now: a model that is
    still training needs ``torch``. When ONNX Runtime cannot be used (not installed, export
    failed, features differ from PyTorch's) the embedder says why and uses PyTorch;
    ``self.runtime`` tells which runs.
    """

    def __init__(
        self,
        model: EmbeddingNet,
        device: torch.device | str = "cpu",
        half: bool = False,
        runtime: Runtime = "auto",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.half = half
        self.runtime = choose(runtime, self.device)
        self.onnx: OnnxBackbone | None = None
        if self.runtime == "onnx":
            try:
                size = model.config.preprocessing.crop
                self.onnx = OnnxBackbone(self.model.backbone, fingerprint(model), size)
            except RuntimeUnavailableError as e:
                log.warning("ONNX Runtime not used, PyTorch runs the backbone: %s", e)
                self.runtime = "torch"

    def embed(
        self, images: Sequence[Image.Image], keep_maps: bool = False
    ) -> tuple[Embedding, list[ImageGeometry]]:
        """images: N RGB pictures -> Embedding (parts (N, R, D), vector (N, D), and with
        ``keep_maps`` the projected maps (N, D, h, w)), N geometries."""
        if not images:
            raise ValueError("embed needs at least one image")
        spec = self.model.config.preprocessing
        prepared = [preprocess(image, spec) for image in images]
        pixels = torch.stack([p for p, _ in prepared]).to(self.device, non_blocking=True)
        return self.embed_pixels(pixels, keep_maps), [g for _, g in prepared]

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor, keep_maps: bool = False) -> Embedding:
        """pixels: (N, 3, crop, crop), already normalised -> Embedding (with its projected maps
        when ``keep_maps``)."""
        if self.onnx is not None:
            features = self.onnx(pixels).to(self.device)
            head: Embedding = self.model.head(features, keep_maps)
            return head
        use_half = self.half and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=use_half):
            embedding: Embedding = self.model(pixels.to(self.device), keep_maps)
        return embedding

    def explain(self, query: Image.Image, result: Image.Image, top: int = 5) -> Explanation:
        """Embed both pictures and explain how ``result`` matches ``query``: the whole score."""
        embedding, (gq, gr) = self.embed([query, result], keep_maps=True)
        return explain_embeddings(embedding[0], gq, embedding[1], gr, self.model.config, top)


def explain_embeddings(
    a: Embedding,
    a_geometry: ImageGeometry,
    b: Embedding,
    b_geometry: ImageGeometry,
    config: ModelConfig,
    top: int = 5,
    bases: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> Explanation:
    """How one embedded image ``b`` matches another ``a`` (each of length 1), with the grid and
    matching settings of the model ``config`` that made them. Each side's global term is split
    over its regions with its global basis (R, D) from ``bases`` where given (a stored item's),
    else from its embedding's map where it kept one (``Embedding.maps``)."""
    with torch.inference_mode():
        match = match_pairs(a, b, config.matching)
    given = bases or (None, None)
    sides = tuple(_basis(e, config.grid) if basis is None else basis
                  for e, basis in zip((a, b), given, strict=True))  # fmt: skip
    return explain(match, a_geometry, b_geometry, config.grid, config.matching, top=top,
                   bases=(sides[0], sides[1]), vectors=(a.vector[0], b.vector[0]))  # fmt: skip


def _basis(embedding: Embedding, grid: int) -> torch.Tensor | None:
    basis = bases_of(embedding, grid)
    return None if basis is None else basis[0]
