"""What does a smaller index cost in ranking? Embed labelled classes once, then store them smaller.

    .venv/bin/python bench/storage_study.py --data ../shared/data/cub-dev \
        [--checkpoint runs/cub/best.safetensors] [--classes 16-20 21-30] [--pca-from gallery]

For each class range (ranked as `diml evaluate` ranks it: every image queries the others, the
global top 100 re-ranked) it prints Recall@1 / MAP@R, by the global vector and re-ranked at the
structural weights 0.3 and 1, with the part grids stored as float32, float16 and int8 (one scale
per part, :mod:`model.quantization`; both sides of every pair), and, for a head-less model, with
the features projected to fewer dimensions without labels: a random orthogonal projection, and
the top principal components of the parts of the images under ``--pca-from`` (a folder; the
default gallery's 80 photos by default), each followed by int8 storage; and with the grids
product-quantized (FAISS's ProductQuantizer, 256 centroids for each run of 4 or 8 coordinates,
trained on the parts of the ranked images themselves, as an index build would train on its
gallery; not what an index stores today). Bytes per item count the grid and the float32 global
vector.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from rerank_study import embedded

from model.checkpoint import load_model
from model.datasets import Record
from model.evaluation import head_scores, ranking_depth
from model.loading import embed_records
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding, EmbeddingNet
from model.quantization import round_trip, stored_bytes

WEIGHTS = (0.3, 1.0)
PQ_SUBVECTORS = (4, 8)
IMAGES = (".jpg", ".jpeg", ".png")


def pca_basis(model: EmbeddingNet, folder: Path, dim: int) -> torch.Tensor:
    """(D, dim): the top principal directions (uncentred, as the parts are compared by cosine)
    of the parts of every image under ``folder``."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGES)
    records = [Record(path=p, label=0) for p in paths]
    embedding, _ = embed_records(model, records, torch.device("cpu"), stored=False)
    parts = embedding.parts.float().reshape(-1, embedding.parts.shape[-1])
    _, _, v = torch.linalg.svd(parts, full_matrices=False)
    return v[:dim].T


def random_basis(width: int, dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(width, dim, generator=generator))
    return q


def projected(embedding: Embedding, basis: torch.Tensor) -> Embedding:
    """Project the (unit) parts and vector, then normalise: as a linear head would (projection
    and pooling commute, and normalising before projecting only scales)."""
    return Embedding(
        F.normalize(embedding.parts.float() @ basis, dim=-1),
        F.normalize(embedding.vector.float() @ basis, dim=-1),
    )


def stored(embedding: Embedding, kind: str) -> Embedding:
    parts = embedding.parts.float()
    if kind == "float16":
        parts = parts.half().float()
    elif kind == "int8":
        parts = torch.from_numpy(round_trip(parts.numpy(), dtype=np.float32))
    return Embedding(parts, embedding.vector.float())


def product_quantized(embedding: Embedding, sub: int) -> Embedding:
    """The grids through a product quantizer of ``sub`` coordinates per 8-bit code."""
    parts = embedding.parts.float().numpy()
    n, regions, width = parts.shape
    flat = np.ascontiguousarray(parts.reshape(-1, width))
    pq = faiss.ProductQuantizer(width, width // sub, 8)
    pq.verbose = False
    pq.train(flat)
    decoded = pq.decode(pq.compute_codes(flat)).reshape(n, regions, width)
    return Embedding(torch.from_numpy(decoded), embedding.vector.float())


def variants(
    model: EmbeddingNet, embedding: Embedding, pca: dict[int, torch.Tensor]
) -> Iterator[tuple[str, Embedding, int]]:
    width = embedding.parts.shape[-1]
    regions = embedding.parts.shape[1]
    for kind, size in (("float32", 4), ("float16", 2)):
        yield kind, stored(embedding, kind), regions * width * size + 4 * width
    yield "int8", stored(embedding, "int8"), stored_bytes(regions, width)
    for sub in PQ_SUBVECTORS:
        yield (f"PQ, {sub} coordinates a byte", product_quantized(embedding, sub),
               regions * width // sub + 4 * width)  # fmt: skip
    if model.config.dim is None:
        for dim, basis in pca.items():
            for name, b in (("PCA", basis), ("random", random_basis(width, dim))):
                yield (f"{name} {dim}-d, int8", stored(projected(embedding, b), "int8"),
                       stored_bytes(regions, dim))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--cache", type=Path, default=Path("out/study"))
    p.add_argument("--classes", nargs="+", default=["16-20", "21-30"])
    p.add_argument("--rerank-k", type=int, default=100)
    p.add_argument("--pca-from", type=Path, default=Path("gallery"))
    p.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    args = p.parse_args()
    model = load_model(args.checkpoint)
    matching = model.config.matching
    pca = {}
    if model.config.dim is None:
        pca = {dim: pca_basis(model, args.pca_from, dim) for dim in args.dims}
    print(f"model {args.checkpoint or 'the training-free default'}")
    print("| classes | stored | bytes / item | global | "
          + " | ".join(f"w = {w:g}" for w in WEIGHTS) + " |")  # fmt: skip
    print("| --- " * (4 + len(WEIGHTS)) + "|")
    for classes in args.classes:
        full, labels = embedded(model, args.data, classes, args.cache, stored=False)
        r = relevant_counts(labels)

        def cell(ranking: torch.Tensor, labels: torch.Tensor = labels, r: torch.Tensor = r) -> str:
            m = retrieval_metrics(labels[ranking], labels, r)
            return f"{m['recall@1']:.2f} / {m['map@r']:.2f}"

        depth = ranking_depth(labels, args.rerank_k)
        for name, embedding, size in variants(model, full, pca):
            scores = head_scores(embedding, depth, args.rerank_k, matching)  # as diml evaluate
            cells = [cell(scores.reranked(w)) for w in WEIGHTS]
            print(f"| {classes} | {name} | {size:,} | {cell(scores.order)} | " + " | ".join(cells)
                  + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
