"""Does a MaxSim middle stage pay? (Qdrant can score the stored part grids by MaxSim itself.)

    .venv/bin/python bench/bench_maxsim.py --cub ../shared/data/cub-dev [--checkpoint FILE]

The two-stage rule re-ranks the global top K (100) by ``global + w * structural``. A three-stage
variant prefetches P > K candidates by the global vector, keeps the K best by MaxSim of the
part grids (``sum_i max_j <q_i, g_j>``, ColBERT's late interaction, which Qdrant computes on a
multivector), then re-ranks those K the same way. It can only help where relevant images lie
beyond the global top K and MaxSim brings them in; it costs a MaxSim over P candidates per
query. Queries: the validation classes (16-20 by default); gallery: the training and
validation classes (1-20), never the test classes. For each rule the table gives Recall@1 and
MAP@R of the final K (with the model's w and with the published w = 1), the share of each
query's relevant images (up to K) among its K candidates, and the time per query of the
MaxSim stage and of the transport stage, batched in torch on this machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from model import load_model
from model.config import MatchingConfig
from model.datasets import read_cub
from model.evaluation import PUBLISHED_WEIGHT
from model.loading import embed_records
from model.matching import ranking_score, rerank_positions, structural_match
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding


def maxsim(query_parts: torch.Tensor, candidate_parts: torch.Tensor) -> torch.Tensor:
    """(B, R, D) queries, (B, P, R, D) candidates -> (B, P) sum over query parts of the best
    candidate part's similarity (unit vectors: cosines)."""
    sims = torch.einsum("brd,bpsd->bprs", query_parts, candidate_parts)
    return sims.amax(dim=3).sum(dim=2)


def run(
    embedding: Embedding,
    labels: torch.Tensor,
    queries: torch.Tensor,
    prefetch: int,
    keep: int,
    weights: list[float],
    matching: MatchingConfig,
    step: int = 16,
) -> dict[str, float]:
    vectors = embedding.vector.float()
    parts = embedding.parts.float()
    sims = vectors[queries] @ vectors.T
    sims[torch.arange(len(queries)), queries] = -torch.inf  # a query never finds itself
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :prefetch]
    maxsim_s = transport_s = 0.0
    candidates = order[:, :keep]
    if prefetch > keep:
        chosen = []
        for a in range(0, len(queries), step):
            q = queries[a : a + step]
            t0 = time.perf_counter()
            score = maxsim(parts[q], parts[order[a : a + step]])
            top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :keep]
            maxsim_s += time.perf_counter() - t0
            # the kept K in global order, so that re-ranking ties fall back to it
            chosen.append(torch.gather(order[a : a + step], 1, top.sort(dim=1).values))
        candidates = torch.cat(chosen)
    global_sim, structural = [], []
    for a in range(0, len(queries), step):
        q, c = queries[a : a + step], candidates[a : a + step]
        t0 = time.perf_counter()
        match = structural_match(parts[q], vectors[q], parts[c], vectors[c], matching)
        transport_s += time.perf_counter() - t0
        global_sim.append(match.global_similarity)
        structural.append(match.structural_similarity)
    g, s = torch.cat(global_sim), torch.cat(structural)
    gallery_labels = labels
    r = relevant_counts(gallery_labels, labels[queries])  # the query itself left out
    row: dict[str, float] = {}
    for w in weights:
        ranked = torch.gather(candidates, 1, rerank_positions(ranking_score(g, s, w), keep))
        metrics = retrieval_metrics(gallery_labels[ranked], labels[queries], r)
        row[f"R@1 w={w:g}"] = metrics["recall@1"]
        row[f"MAP@R w={w:g}"] = metrics["map@r"]
    found = (gallery_labels[candidates] == labels[queries, None]).sum(dim=1).float()
    row["candidates"] = 100 * float((found / r.clamp(max=keep).clamp(min=1)).mean())
    row["maxsim ms"] = 1000 * maxsim_s / len(queries)
    row["transport ms"] = 1000 * transport_s / len(queries)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cub", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--gallery-classes", default="1-20")
    parser.add_argument("--query-classes", default="16-20")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.checkpoint)
    data = read_cub(args.cub).select(args.gallery_classes)
    query_set = {r.path for r in read_cub(args.cub).select(args.query_classes).records}
    embedding, _ = embed_records(model, data.records, torch.device("cpu"))
    labels = torch.tensor([r.label for r in data.records])
    queries = torch.tensor([i for i, r in enumerate(data.records) if r.path in query_set])
    matching = model.config.matching
    weights = sorted({matching.structural_weight, PUBLISHED_WEIGHT})
    print(
        f"gallery: cub classes {args.gallery_classes} ({len(labels)} images); queries: classes "
        f"{args.query_classes} ({len(queries)}); model's w = {matching.structural_weight:g}"
    )
    rules = [(100, 100), (200, 200), (200, 100), (400, 100), (1000, 100)]
    header = None
    for prefetch, keep in rules:
        prefetch = min(prefetch, len(labels) - 1)
        row = run(embedding, labels, queries, prefetch, keep, weights, matching)
        if header is None:
            header = ["rule", *row]
            print("| " + " | ".join(header) + " |")
            print("|" + " --- |" * len(header))
        name = f"global top {keep}" if prefetch == keep else f"global {prefetch} -> MaxSim {keep}"
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
