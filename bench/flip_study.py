"""Would a gallery embedded with its mirror image rank better? A test-time augmentation, measured.

    .venv/bin/python bench/flip_study.py --data ../shared/data/cub-dev \
        [--checkpoint runs/cub/best.safetensors] [--classes 16-20 21-30]

For each class range (every image queries the others, as `diml evaluate` ranks them) it prints
Recall@1 / MAP@R of the global ranking three ways: the plain vectors on both sides (what the
service does); the gallery side's vector averaged with its mirror image's (normalised sum; the
query as it is, so a search costs nothing more and an index build twice the backbone); and both
sides averaged (a search costs a second backbone pass). The centre crop is symmetric, so the
mirror of the crop is the crop of the mirror. Only the global term: the part grids, and so the
structural term and its explanations, would stay the picture's own.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import load_model
from model.config import Preprocessing
from model.datasets import Record, read_dataset
from model.evaluation import global_order, ranking_depth
from model.loading import batches, records_embedder
from model.metrics import relevant_counts, retrieval_metrics
from model.network import EmbeddingNet


@torch.inference_mode()
def vectors(
    model: EmbeddingNet, records: Sequence[Record], spec: Preprocessing
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) global vectors of the images and of their mirror images, from one decode."""
    embedder = records_embedder(model, torch.device("cpu"), runtime="auto")
    plain, mirrored = [], []
    for pixels, _ in batches(records, spec, batch_size=32):
        plain.append(embedder.embed_pixels(pixels).vector.float())
        mirrored.append(embedder.embed_pixels(pixels.flip(-1)).vector.float())
    return torch.cat(plain), torch.cat(mirrored)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--classes", nargs="+", default=["16-20", "21-30"])
    args = p.parse_args()
    model = load_model(args.checkpoint)
    print(f"model {args.checkpoint or 'the training-free default'}")
    print("| classes | plain | gallery with its mirror | both sides with their mirrors |")
    print("| --- | --- | --- | --- |")
    for classes in args.classes:
        images = read_dataset(args.data, classes=classes)
        labels, r = images.labels, relevant_counts(images.labels)
        depth = ranking_depth(labels, 0)
        plain, mirrored = vectors(model, images.records, model.config.preprocessing)
        averaged = F.normalize(plain + mirrored, dim=-1)
        cells = []
        for q, g in ((plain, plain), (plain, averaged), (averaged, averaged)):
            m = retrieval_metrics(labels[global_order(q, g, depth)], labels, r)
            cells.append(f"{m['recall@1']:.2f} / {m['map@r']:.2f}")
        print(f"| {classes} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
