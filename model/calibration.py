"""Choosing the weight of the structural term in the ranking score on validation classes.

The score of a re-ranked candidate is ``global + w * structural``
(``model.matching.ranking_score``). The published rule fixes ``w = 1``; but the two terms come
from the same features, and when the global ranking is already good a full-weight structural
term can undo it (the ImageNet head-less model's MAP@R falls with any ``w > 0`` on CUB). So
``w`` is chosen per model on its validation classes: the weight of :data:`WEIGHTS` that
maximises ``Recall@1 + MAP@R`` of the re-ranked ranking, ties going to the smaller weight.
``w = 0`` is among them, so on the validation classes the chosen rule is never worse than the
global ranking by that measure.

The same ranking calibrates the verdict on each hit (:func:`score_bands`): ``close`` above
what the closest other-class candidate scores for 95 % of the validation queries, ``related``
above what it scores for half of them, ``unrelated`` below. :func:`verdict_rates` measures
those bands on any labelled set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import MatchingConfig
from model.evaluation import HeadScores, head_scores, ranking_depth
from model.matching import ranking_score, rerank_positions
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
# Verdict bands (score_bands): a hit is ``close`` when it outscores the closest other-class
# candidate of this share of the validation queries, ``related`` of this share; verdict_rates
# measures them over each query's first VERDICT_TOP hits (what a search shows).
CLOSE_QUANTILE = 0.95
RELATED_QUANTILE = 0.5
VERDICT_TOP = 10


def objective(metrics: dict[str, float]) -> float:
    """What calibration and epoch selection maximise: Recall@1 + MAP@R (percentages)."""
    return metrics["recall@1"] + metrics["map@r"]


@dataclass(frozen=True)
class Calibration:
    """The chosen weight, the global ranking's metrics and the re-ranked metrics per weight."""

    weight: float
    global_metrics: dict[str, float]
    reranked: dict[float, dict[str, float]]
    bands: tuple[float, float]  # (related, close) score bands at the chosen weight

    @property
    def best(self) -> dict[str, float]:
        """The re-ranked metrics at the chosen weight."""
        return self.reranked[self.weight]


def calibrate(
    embedding: Embedding,
    labels: torch.Tensor,
    rerank_k: int = 100,
    matching: MatchingConfig | None = None,
    device: torch.device | None = None,
    weights: tuple[float, ...] = WEIGHTS,
) -> Calibration:
    """Choose the structural weight for ``embedding`` (N images of the validation classes,
    ``labels`` (N,)): transport is solved once for every query's global top ``rerank_k``,
    then each weight re-sorts those candidates."""
    if not weights or min(weights) < 0:
        raise ValueError(f"calibration needs weights >= 0, got {weights}")
    scores = head_scores(embedding, ranking_depth(labels, rerank_k), rerank_k, matching, device)
    r = relevant_counts(labels)
    rows = {w: retrieval_metrics(labels[scores.reranked(w)], labels, r) for w in weights}
    best = max(sorted(weights), key=lambda w: objective(rows[w]))  # first maximum: smallest w
    global_metrics = retrieval_metrics(labels[scores.order], labels, r)
    return Calibration(best, global_metrics, rows, score_bands(scores, labels, best))


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


def score_bands(scores: HeadScores, labels: torch.Tensor, weight: float) -> tuple[float, float]:
    """(related, close): each query's closest impostor is the best-scoring candidate of another
    class among its first ``scores.k`` (under the rule with ``weight``); a hit is ``close`` when
    it outscores the closest impostor of CLOSE_QUANTILE of the queries, ``related`` when it
    outscores that of RELATED_QUANTILE. Impostors, not precision, set the bands: precision
    follows how many same-class images a set holds and how easy its classes are (five easy
    validation species would call nearly every hit close), the impostors' scores much less."""
    score = ranking_score(scores.global_similarity, scores.structural_similarity, weight)
    other = labels[scores.order[:, : scores.k]] != labels[:, None]
    has = other.any(dim=1)
    if scores.k == 0 or not bool(has.any()):
        return 1.0 + weight, 1.0 + weight  # no impostor seen: nothing is called close
    best = torch.where(other, score, torch.tensor(float("-inf"))).max(dim=1).values[has]
    best = best.double()
    return float(best.quantile(RELATED_QUANTILE)), float(best.quantile(CLOSE_QUANTILE))


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
