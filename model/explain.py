"""Explanations: the exact decomposition of one pair's ranking score over regions of both images.

``score = global_similarity + w * structural_similarity`` (``w``: the model's
``MatchingConfig.structural_weight``), and each term splits over regions:

- structural: ``C = plan * similarity`` sums to ``structural_similarity``; its row sums are the
  query parts' contributions, its column sums the result parts';
- global: the cosine of two mean-pooled maps splits over map positions, shared out among the
  same grid cells, through each image's global basis (:mod:`model.attribution`, made from its
  projected map, ``Embedding.maps``): a side without one (a stored item whose picture is gone)
  has no global split, and the part of the score left unexplained is its ``residual``;
- total: ``global + w * structural`` per region, summing to ``score`` (less the residual).

Everything a user needs to see why two images match, in plain Python types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from model.attribution import global_basis
from model.config import MatchingConfig
from model.matching import StructuralMatch, ranking_score
from model.network import Embedding
from model.preprocessing import ImageGeometry

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PartMatch:
    """One query part paired with one result part by the flow."""

    query_region: int
    result_region: int
    flow: float
    similarity: float
    contribution: float


def verdict_of(score: float, matching: MatchingConfig) -> str | None:
    """``close``, ``related`` or ``unrelated`` by the model's calibrated score bands
    (``MatchingConfig.close_score`` and ``related_score``); None for a model without them."""
    if matching.close_score is None or matching.related_score is None:
        return None
    if score >= matching.close_score:
        return "close"
    return "related" if score >= matching.related_score else "unrelated"


def ranking_rule(weight: float) -> str:
    """What orders the hits, in words, for headings and captions."""
    if weight == 0:
        return "ranked by global similarity"
    return f"re-ranked by structural matching (weight {weight:g})"


@dataclass(frozen=True)
class Side:
    """One image's regions' contributions, per term: ``global_`` (None where the image's
    global basis was not at hand), ``structural`` and ``total`` (= global + w * structural), and the
    ``residual``, ``score - sum(total)``: float rounding when the global split is exact."""

    global_: list[float] | None
    structural: list[float]
    total: list[float]
    residual: float


@dataclass(frozen=True)
class Explanation:
    """Why a result matches a query. Matrices are R x P with rows = query regions.

    Region boxes are ``(x0, y0, x1, y1)`` in each image's own pixel coordinates, row-major over
    the ``grid x grid`` cells; every contribution list follows that order.
    """

    epsilon: float
    grid: int
    plan: list[list[float]]
    similarity: list[list[float]]
    query_weights: list[float]
    result_weights: list[float]
    query_regions: list[Box]
    result_regions: list[Box]
    query: Side
    result: Side
    matches: list[PartMatch]
    global_similarity: float
    structural_similarity: float
    structural_weight: float
    score: float
    verdict: str | None
    converged: bool
    marginal_error: float
    iterations: int

    @property
    def query_contributions(self) -> list[float]:
        """The query parts' contributions to the structural similarity."""
        return self.query.structural

    @property
    def result_contributions(self) -> list[float]:
        """The result parts' contributions to the structural similarity."""
        return self.result.structural

    @property
    def ranked_by(self) -> str:
        return ranking_rule(self.structural_weight)

    @property
    def exact(self) -> bool:
        """Whether both sides' global term is split (the totals then add up to the score)."""
        return self.query.global_ is not None and self.result.global_ is not None

    def to_dict(self, matrices: bool = True) -> dict[str, Any]:
        """The JSON form (``diml explain --json``); ``matrices=False`` leaves out the R x R ones."""
        sides = {"query": self.query, "result": self.result}
        out: dict[str, Any] = {
            "epsilon": self.epsilon,
            "grid": self.grid,
            "query_weights": self.query_weights,
            "result_weights": self.result_weights,
            "query_regions": [list(box) for box in self.query_regions],
            "result_regions": [list(box) for box in self.result_regions],
            "contributions": {
                "global": {name: side.global_ for name, side in sides.items()},
                "structural": {name: side.structural for name, side in sides.items()},
                "total": {name: side.total for name, side in sides.items()},
                "residual": {name: side.residual for name, side in sides.items()},
                "exact": self.exact,
            },
            "matches": [vars(m) for m in self.matches],
            "global_similarity": self.global_similarity,
            "structural_similarity": self.structural_similarity,
            "structural_weight": self.structural_weight,
            "score": self.score,
            "verdict": self.verdict,
            "ranked_by": self.ranked_by,
            "sinkhorn": {
                "converged": self.converged,
                "marginal_error": self.marginal_error,
                "iterations": self.iterations,
            },
        }
        if matrices:
            out["plan"] = self.plan
            out["similarity"] = self.similarity
        return out


def explain(
    match: StructuralMatch,
    query_geometry: ImageGeometry,
    result_geometry: ImageGeometry,
    grid: int,
    matching: MatchingConfig,
    index: tuple[int, int] = (0, 0),
    top: int = 5,
    bases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    vectors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Explanation:
    """The explanation of pair ``index = (b, k)`` of ``match``, with its ``top`` strongest matches.

    ``matching`` is the configuration ``match`` was computed with (epsilon and the weight of the
    structural term in the score). ``bases``: the query's and the result's global bases (R, D)
    (:func:`model.attribution.global_basis` of ``Embedding.maps``), and ``vectors`` their unit
    global vectors (D,) each, to split the global term; a side without a basis is not split (its
    residual says how much of the score its regions leave unexplained).

    The strongest matches are the plan entries with the largest contributions ``T_ij * S_ij``.
    """
    b, k = index
    plan = match.plan[b, k].detach().double().cpu()  # (R, P)
    similarity = match.similarity[b, k].detach().double().cpu()
    if plan.shape != (grid * grid, grid * grid):
        raise ValueError(f"plan {tuple(plan.shape)} does not fit a {grid}x{grid} grid")
    contributions = plan * similarity
    order = torch.argsort(contributions.flatten(), descending=True)[: max(top, 0)]
    cols = plan.shape[1]
    matches = [
        PartMatch(
            query_region=int(i // cols),
            result_region=int(i % cols),
            flow=float(plan.flatten()[i]),
            similarity=float(similarity.flatten()[i]),
            contribution=float(contributions.flatten()[i]),
        )
        for i in order.tolist()
    ]
    structural = float(contributions.sum())
    global_sim = float(match.global_similarity[b, k])
    weight = matching.structural_weight
    score = ranking_score(global_sim, structural, weight)
    explanation = Explanation(
        epsilon=matching.epsilon,
        grid=grid,
        plan=plan.tolist(),
        similarity=similarity.tolist(),
        query_weights=match.query_weights[b, k].double().cpu().tolist(),
        result_weights=match.candidate_weights[b, k].double().cpu().tolist(),
        query_regions=query_geometry.cell_boxes(grid),
        result_regions=result_geometry.cell_boxes(grid),
        query=_side(None, contributions.sum(dim=1).tolist(), weight, score),
        result=_side(None, contributions.sum(dim=0).tolist(), weight, score),
        matches=matches,
        global_similarity=global_sim,
        structural_similarity=structural,
        structural_weight=weight,
        score=score,
        verdict=verdict_of(score, matching),
        converged=bool(match.converged[b, k]),
        marginal_error=float(match.marginal_error[b, k]),
        iterations=match.iterations,
    )
    if bases == (None, None):
        return explanation
    if vectors is None:
        raise ValueError("explain: splitting the global term needs both global vectors")
    return with_global_split(explanation, bases, vectors)


def with_global_split(
    e: Explanation,
    bases: tuple[torch.Tensor | None, torch.Tensor | None],
    vectors: tuple[torch.Tensor, torch.Tensor],
) -> Explanation:
    """``e`` with the global term split over each side's regions where that side's global
    basis (R, D) is given (``bases``: query's, result's; :func:`model.attribution.global_basis`);
    ``vectors``: the query's and the result's unit global vectors (D,), each side's split taken
    against the other's vector. A side whose basis is None keeps what it had."""
    sides = []
    for side, own, other in ((e.query, bases[0], vectors[1]), (e.result, bases[1], vectors[0])):
        if own is None:
            sides.append(side)
            continue
        if own.shape != (e.grid * e.grid, other.shape[-1]):
            raise ValueError(f"a global basis must be (R, D) = ({e.grid ** 2}, "
                             f"{other.shape[-1]}), got {tuple(own.shape)}")  # fmt: skip
        split = own.detach().cpu().double() @ other.detach().cpu().double()
        sides.append(_side(split.tolist(), side.structural, e.structural_weight, e.score))
    return dataclasses.replace(e, query=sides[0], result=sides[1])


def bases_of(embedding: Embedding, grid: int) -> torch.Tensor | None:
    """(B, R, D) float64: the global bases of an embedding that kept its maps, else None."""
    return None if embedding.maps is None else global_basis(embedding.maps, grid)


def _side(
    global_: list[float] | None, structural: list[float], weight: float, score: float
) -> Side:
    part = torch.tensor(structural, dtype=torch.float64) * weight
    total = part if global_ is None else part + torch.tensor(global_, dtype=torch.float64)
    return Side(global_, structural, total.tolist(), score - float(total.sum()))
