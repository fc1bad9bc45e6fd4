"""Explanations: the exact decomposition of one pair's score into part-to-part contributions.

``score = global_similarity + structural_weight * structural_similarity`` and
``structural_similarity = sum_ij C_ij`` with ``C = plan * similarity`` (the weight is the
model's ``MatchingConfig.structural_weight``); row sums of ``C`` are the query parts'
contributions, column sums the result parts'. Everything a user needs to see why two images
match, in plain Python types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model.config import MatchingConfig
from model.images import ImageGeometry
from model.matching import StructuralMatch, ranking_score

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PartMatch:
    """One query part paired with one result part by the flow."""

    query_region: int
    result_region: int
    flow: float
    similarity: float
    contribution: float


@dataclass(frozen=True)
class Explanation:
    """Why a result matches a query. Matrices are R x P with rows = query regions.

    Region boxes are ``(x0, y0, x1, y1)`` in each image's own pixel coordinates, row-major over
    the ``grid x grid`` cells.
    """

    epsilon: float
    grid: int
    plan: list[list[float]]
    similarity: list[list[float]]
    query_weights: list[float]
    result_weights: list[float]
    query_regions: list[Box]
    result_regions: list[Box]
    query_contributions: list[float]
    result_contributions: list[float]
    matches: list[PartMatch]
    global_similarity: float
    structural_similarity: float
    structural_weight: float
    score: float
    converged: bool
    marginal_error: float
    iterations: int

    def to_dict(self, matrices: bool = True) -> dict[str, Any]:
        """The JSON form (``diml explain --json``); ``matrices=False`` leaves out the R x R ones."""
        out: dict[str, Any] = {
            "epsilon": self.epsilon,
            "grid": self.grid,
            "query_weights": self.query_weights,
            "result_weights": self.result_weights,
            "query_regions": [list(box) for box in self.query_regions],
            "result_regions": [list(box) for box in self.result_regions],
            "contributions": {
                "query": self.query_contributions,
                "result": self.result_contributions,
            },
            "matches": [vars(m) for m in self.matches],
            "global_similarity": self.global_similarity,
            "structural_similarity": self.structural_similarity,
            "structural_weight": self.structural_weight,
            "score": self.score,
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
) -> Explanation:
    """The explanation of pair ``index = (b, k)`` of ``match``, with its ``top`` strongest matches.

    ``matching`` is the configuration ``match`` was computed with (epsilon and the weight of the
    structural term in the score).

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
    return Explanation(
        epsilon=matching.epsilon,
        grid=grid,
        plan=plan.tolist(),
        similarity=similarity.tolist(),
        query_weights=match.query_weights[b, k].double().cpu().tolist(),
        result_weights=match.candidate_weights[b, k].double().cpu().tolist(),
        query_regions=query_geometry.cell_boxes(grid),
        result_regions=result_geometry.cell_boxes(grid),
        query_contributions=contributions.sum(dim=1).tolist(),
        result_contributions=contributions.sum(dim=0).tolist(),
        matches=matches,
        global_similarity=global_sim,
        structural_similarity=structural,
        structural_weight=weight,
        score=ranking_score(global_sim, structural, weight),
        converged=bool(match.converged[b, k]),
        marginal_error=float(match.marginal_error[b, k]),
        iterations=match.iterations,
    )
