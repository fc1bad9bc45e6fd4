"""When does structural re-ranking pay? Embed a labelled set once, then try ranking rules on it.

    .venv/bin/python bench/rerank_study.py --data ../shared/data/cub-dev \
        [--checkpoint runs/cub/best.safetensors] [--cache out/study] [--classes 16-20 21-30]

For each class range (each one ranked on its own, as `diml evaluate` ranks it) it prints global
and re-ranked Recall@1 / MAP@R for every structural weight of model.calibration.WEIGHTS under the
matching rules tried (balanced transport as shipped; the dustbin and unbalanced variants when the
model supports them). Embeddings are cached under --cache, keyed by the checkpoint's fingerprint.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from model.calibration import WEIGHTS, objective
from model.checkpoint import fingerprint, load_model
from model.datasets import read_dataset
from model.evaluation import head_scores, ranking_depth
from model.loading import embed_records
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding


def embedded(args: argparse.Namespace, classes: str) -> tuple[Embedding, torch.Tensor]:
    model = load_model(args.checkpoint)
    key = fingerprint(model)[:12]
    path = Path(args.cache) / f"{key}-{classes}.pt"
    images = read_dataset(Path(args.data), classes=classes)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return Embedding(saved["parts"], saved["vector"]), images.labels
    embedding, _ = embed_records(model, images.records, torch.device("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"parts": embedding.parts, "vector": embedding.vector}, path)
    return embedding, images.labels


def sweep(embedding: Embedding, labels: torch.Tensor, rerank_k: int, matching) -> dict:
    scores = head_scores(embedding, ranking_depth(labels, rerank_k), rerank_k, matching)
    r = relevant_counts(labels)
    rows = {"global": retrieval_metrics(labels[scores.order], labels, r)}
    for w in WEIGHTS:
        rows[w] = retrieval_metrics(labels[scores.reranked(w)], labels, r)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--cache", default="out/study")
    p.add_argument("--classes", nargs="+", default=["16-20", "21-30"])
    p.add_argument("--rerank-k", type=int, default=100)
    p.add_argument("--epsilon", type=float, nargs="+", default=[0.05])
    args = p.parse_args()
    model = load_model(args.checkpoint)
    for classes in args.classes:
        embedding, labels = embedded(args, classes)
        for eps in args.epsilon:
            matching = dataclasses.replace(model.config.matching, epsilon=eps)
            rows = sweep(embedding, labels, args.rerank_k, matching)
            print(f"classes {classes}, epsilon {eps}:")
            for name, m in rows.items():
                print(
                    f"  {name!s:>7}  R@1 {m['recall@1']:6.2f}  MAP@R {m['map@r']:6.2f}  "
                    f"sum {objective(m):7.2f}"
                )


if __name__ == "__main__":
    main()
