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
above what it scores for half of them, ``unrelated`` below
(``model.evaluation.verdict_rates`` measures those bands on any labelled set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import MatchingConfig
from model.evaluation import HeadScores, head_scores, ranking_depth
from model.matching import ranking_score
from model.metrics import relevant_counts, retrieval_metrics
from model.network import Embedding

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
# Verdict bands (score_bands): a hit is ``close`` when it outscores the closest other-class
# candidate of this share of the validation queries, ``related`` of this share
# (model.evaluation.verdict_rates measures them on any labelled set).
CLOSE_QUANTILE = 0.95
RELATED_QUANTILE = 0.5


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
