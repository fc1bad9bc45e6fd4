"""Evaluation on a labelled image set: every image queries all the others.

- retrieval (here): Recall@K, R-Precision and MAP@R of the global ranking and of the same
  ranking with its top-K re-ranked by the model's score (:func:`model.matching.ranking_score`,
  the two-stage rule of :func:`model.matching.rerank_positions`);
- keypoint transfer (CUB): :mod:`model.keypoints`;
- deletion: :mod:`model.deletion`.

Images are embedded by :func:`model.loading.embed_records`.

Everything is batched; the all-pairs global similarity is computed in chunks of queries, so a
set of SOP's size (60k images) fits in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from model.config import MatchingConfig
from model.datasets import ImageSet
from model.deletion import deletion_check, ranking_score_deletion
from model.keypoints import keypoint_report
from model.loading import batches, embed_records, records_embedder
from model.matching import ranking_score, rerank_positions, structural_match
from model.metrics import RECALL_KS, relevant_counts, retrieval_metrics
from model.network import Embedding, EmbeddingNet
from model.runtime import Runtime

PUBLISHED_WEIGHT = 1.0  # the structural weight of the published ranking rule
VERDICT_TOP = 10  # verdicts are measured on each query's first hits: what a search shows


@dataclass(frozen=True)
class Rankings:
    """Each query's ranking of the other images, best first: (N, depth) indices."""

    global_order: torch.Tensor
    reranked_order: torch.Tensor
    rerank_k: int


@dataclass(frozen=True)
class HeadScores:
    """Every query's global ranking and both terms of the score for its first ``k`` candidates.

    order: (N, depth) indices by the global vector, best first (the query left out);
    global_similarity, structural_similarity: (N, k) for ``order[:, :k]``. Computing the
    structural term once lets any weight of it be tried without solving transport again.
    """

    order: torch.Tensor
    global_similarity: torch.Tensor
    structural_similarity: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.global_similarity.shape[1])

    def reranked(self, weight: float) -> torch.Tensor:
        """(N, depth): the first ``k`` re-ranked by ``global + weight * structural`` (stable:
        ties keep the global order), the rest in global order."""
        if self.k < 2:
            return self.order
        score = ranking_score(self.global_similarity, self.structural_similarity, weight)
        out = self.order.clone()
        out[:, : self.k] = torch.gather(self.order[:, : self.k], 1, rerank_positions(score, self.k))
        return out

    def rankings(self, matching: MatchingConfig | None = None) -> Rankings:
        """The global ranking and the one re-ranked by the model's score (``matching``'s
        structural weight)."""
        weight = (matching or MatchingConfig()).structural_weight
        return Rankings(self.order, self.reranked(weight), self.k)


def global_order(
    queries: torch.Tensor, gallery: torch.Tensor, depth: int, chunk: int = 256
) -> torch.Tensor:
    """(N, depth): each query's most similar gallery vectors by inner product, the query's own
    position left out (query i is gallery item i); stable, so ties keep the gallery's order.
    ``queries`` and ``gallery`` may differ (e.g. a gallery embedded another way)."""
    orders = []
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ gallery.T  # (b, N)
        rows = torch.arange(len(sims), device=sims.device)
        sims[rows, rows + start] = -torch.inf
        orders.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth])
    return torch.cat(orders)


def head_scores(
    embedding: Embedding,
    depth: int,
    rerank_k: int,
    matching: MatchingConfig | None = None,
    device: torch.device | None = None,
    chunk: int = 256,
    pairs_per_step: int = 8192,
) -> HeadScores:
    """Rank every image against all others by the global vector (stable: ties keep the data
    set's order) and match each query with its first ``rerank_k`` candidates."""
    n = len(embedding)
    depth = min(depth, n - 1)
    rerank_k = min(rerank_k, depth)
    device = device or torch.device("cpu")
    vectors = embedding.vector.to(device, torch.float32)
    order = global_order(vectors, vectors, depth, chunk).cpu()
    global_sim = torch.zeros(n, rerank_k)
    structural = torch.zeros(n, rerank_k)
    step = max(1, pairs_per_step // max(rerank_k, 1))
    for a in range(0, n if rerank_k else 0, step):
        queries = torch.arange(a, min(a + step, n))
        candidates = order[queries, :rerank_k]
        match = structural_match(
            embedding.parts[queries].to(device, torch.float32),
            embedding.vector[queries].to(device),
            embedding.parts[candidates].to(device, torch.float32),
            embedding.vector[candidates].to(device),
            matching,
        )
        global_sim[queries] = match.global_similarity.cpu()
        structural[queries] = match.structural_similarity.cpu()
    return HeadScores(order, global_sim, structural)


def rank_all(
    embedding: Embedding,
    depth: int,
    rerank_k: int,
    matching: MatchingConfig | None = None,
    device: torch.device | None = None,
    chunk: int = 256,
) -> Rankings:
    """Rank every image against all others by the global vector, then re-rank each top-K by
    the model's score (``matching.structural_weight`` weighs the structural term).

    Ties keep the data set's order (stable sorts). ``depth`` >= ``rerank_k``; the query itself
    is never in its own ranking.
    """
    return head_scores(embedding, depth, rerank_k, matching, device, chunk).rankings(matching)


def retrieval_report(rankings: Rankings, labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """{"global": metrics, "reranked": metrics} in percent."""
    r = relevant_counts(labels)
    return {
        name: retrieval_metrics(labels[order], labels, r)
        for name, order in (
            ("global", rankings.global_order),
            ("reranked", rankings.reranked_order),
        )
    }


def ranking_depth(labels: torch.Tensor, rerank_k: int) -> int:
    """How deep the rankings must go: Recall@8, the largest R, and the re-ranked top-K."""
    return max(max(RECALL_KS), int(relevant_counts(labels).max()), rerank_k)


def evaluate(
    model: EmbeddingNet,
    images: ImageSet,
    rerank_k: int = 100,
    device: torch.device | None = None,
    batch_size: int = 32,
    workers: int = 0,
    keypoints: bool = True,
    progress: Callable[[int], None] | None = None,
    runtime: Runtime = "auto",
    deletion_queries: int | None = None,
) -> dict[str, Any]:
    """The full report (see the module docstring) as a JSON-ready dict, percentages 0-100.

    ``report["deletion"]["ranking_score"]``: the image-domain deletion check of the whole
    score (:func:`model.deletion.ranking_score_deletion`) of each query and its top hit under
    the model's ranking, over every image, or ``deletion_queries`` of them evenly spaced in the
    set's order (0: not run).
    """
    device = device or torch.device("cpu")
    started = time.perf_counter()
    embedder = records_embedder(model, device, runtime)
    embedding, geometry = embed_records(
        model, images.records, device, batch_size, workers, progress, embedder=embedder
    )
    report = evaluate_embeddings(
        embedding,
        images,
        geometry,
        model.config.grid,
        rerank_k,
        model.config.matching,
        device,
        keypoints,
    )
    n = len(embedding)
    count = n if deletion_queries is None else min(deletion_queries, n)
    if count > 0 and n > 1:
        deletion_started = time.perf_counter()
        matching = model.config.matching
        # The top hit under the model's ranking, as evaluate_embeddings ranked (same rule).
        ranked = rank_all(embedding, max(rerank_k, 1), rerank_k, matching, device)
        top1 = ranked.reranked_order[:, 0]
        queries = torch.arange(count) * n // count  # every image, or evenly spaced ones
        loader = batches(
            [images.records[int(i)] for i in queries], model.config.preprocessing, batch_size,
            workers,
        )  # fmt: skip
        pairs = (
            (pixels, hits)
            for (pixels, _), hits in zip(loader, top1[queries].split(batch_size), strict=True)
        )
        checked = ranking_score_deletion(
            pairs, embedder.embed_pixels, embedding, model.config.grid, matching
        )
        checked["seconds"] = round(time.perf_counter() - deletion_started, 2)
        report.setdefault("deletion", {})["ranking_score"] = checked
    report["grid"] = model.config.grid
    report["dim"] = model.dim
    report["structural_weight"] = model.config.matching.structural_weight
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def evaluate_embeddings(
    embedding: Embedding,
    images: ImageSet,
    geometry: torch.Tensor | None,
    grid: int,
    rerank_k: int = 100,
    matching: MatchingConfig | None = None,
    device: torch.device | None = None,
    keypoints: bool = True,
    deletion: bool = True,
) -> dict[str, Any]:
    """Retrieval, and on keypoint-annotated sets PCK and the deletion check, of embeddings."""
    labels = images.labels
    depth = ranking_depth(labels, rerank_k)
    scores = head_scores(embedding, depth, rerank_k, matching, device)
    rankings = scores.rankings(matching)
    r = relevant_counts(labels)
    report: dict[str, Any] = {"n_queries": int((r > 0).sum())}
    report["rerank_k"] = rankings.rerank_k
    report.update(retrieval_report(rankings, labels))
    # The published rule (structural weight 1) beside the model's, to show what it would do.
    published = scores.reranked(PUBLISHED_WEIGHT)
    report["reranked_published"] = retrieval_metrics(labels[published], labels, r)
    if matching is not None and matching.close_score is not None:
        report["verdicts"] = verdict_rates(scores, labels, matching)
    if keypoints and geometry is not None and images.has_keypoints:
        report["pck"] = keypoint_report(
            images, embedding, geometry, rankings.reranked_order, rankings.rerank_k, grid, matching
        )
    if deletion:
        queries = torch.arange(len(embedding))
        top1 = rankings.reranked_order[:, 0]
        report["deletion"] = deletion_check(embedding, queries, top1, matching)
    return report


def shown_hits(
    scores: HeadScores, labels: torch.Tensor, weight: float, top: int = VERDICT_TOP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's first ``top`` hits under the rule with ``weight``: their scores and whether
    each is of the query's class, both (N * top,), flattened."""
    score = ranking_score(scores.global_similarity, scores.structural_similarity, weight)
    top = min(top, scores.k)
    positions = rerank_positions(score, scores.k)[:, :top]  # (N, top) into the head
    items = torch.gather(scores.order[:, : scores.k], 1, positions)
    relevant = labels[items] == labels[:, None]
    return torch.gather(score, 1, positions).flatten(), relevant.flatten()


def verdict_rates(
    scores: HeadScores, labels: torch.Tensor, matching: MatchingConfig, top: int = VERDICT_TOP
) -> dict[str, dict[str, float]]:
    """How the model's bands sort each query's first ``top`` hits on a labelled set: per verdict,
    the share of hits given it and the share of those of the query's class (percent)."""
    if matching.close_score is None or matching.related_score is None:
        return {}
    score, relevant = shown_hits(scores, labels, matching.structural_weight, top)
    close = score >= matching.close_score
    related = (score >= matching.related_score) & ~close
    out = {}
    for name, chosen in (("close", close), ("related", related), ("unrelated", ~close & ~related)):
        n = int(chosen.sum())
        right = float(relevant[chosen].double().mean()) if n else 0.0
        out[name] = {
            "hits": round(100.0 * n / max(len(score), 1), 2),
            "of_query_class": round(100.0 * right, 2),
        }
    return out
