"""Structural matching (DIML): an optimal-transport flow between two part grids.

For a query q and a candidate g with L2-normalised parts ``q_i, g_j`` and global vectors
``q̄, ḡ``:

- ``S[i, j] = <q_i, g_j>``;
- ``mu_i ∝ relu(<q_i, ḡ>)``, ``nu_j ∝ relu(<g_j, q̄>)`` (uniform when all are zero);
- ``T`` = entropic OT plan for the cost ``1 - S`` (:func:`model.optimal_transport.sinkhorn`);
- ``SS = sum_ij T_ij S_ij``; ``score = <q̄, ḡ> + w * SS`` with ``w = config.structural_weight``
  (1 in the published rule); contributions ``C = T ⊙ S`` sum to ``SS``.

Everything is batched over ``(B, K)`` query-candidate pairs and computed in fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from model.config import MatchingConfig
from model.network import Embedding
from model.optimal_transport import sinkhorn


@dataclass(frozen=True)
class StructuralMatch:
    """The result for B queries x K candidates each; R query parts, P candidate parts.

    similarity, plan: (B, K, R, P); query_weights: (B, K, R); candidate_weights: (B, K, P);
    structural_similarity, global_similarity, score, marginal_error, converged: (B, K).
    """

    similarity: torch.Tensor
    plan: torch.Tensor
    query_weights: torch.Tensor
    candidate_weights: torch.Tensor
    structural_similarity: torch.Tensor
    global_similarity: torch.Tensor
    score: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor
    iterations: int

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}  # fmt: skip

    def to(self, device: torch.device | str) -> StructuralMatch:
        """The same result with every tensor on ``device``, in one transfer: the tensors travel
        packed in one buffer (of their common dtype, so values are unchanged) and are unpacked
        there, so that moving a result off a GPU costs one synchronisation, not one per field."""
        device = torch.device(device)
        if all(t.device == device for t in self._tensors().values()):
            return self
        return self._packed_to(device)

    def _packed_to(self, device: torch.device) -> StructuralMatch:
        tensors = self._tensors()
        common = torch.float32
        for t in tensors.values():
            common = torch.promote_types(common, t.dtype)
        packed = torch.cat([t.reshape(-1).to(common) for t in tensors.values()]).to(device)
        moved: dict[str, Any] = {}
        start = 0
        for name, t in tensors.items():
            moved[name] = packed[start : start + t.numel()].reshape(t.shape).to(t.dtype)
            start += t.numel()
        return dataclasses.replace(self, **moved)

    def pick(self, rows: torch.Tensor, columns: torch.Tensor) -> StructuralMatch:
        """The pairs ``(rows[h], columns[h])`` as a result over (1, H), where the tensors are:
        what explaining H hits needs, without moving the whole (B, K) result."""
        picked: dict[str, Any] = {n: t[rows, columns][None] for n, t in self._tensors().items()}
        return dataclasses.replace(self, **picked)

    @property
    def contributions(self) -> torch.Tensor:
        """(B, K, R, P): ``plan * similarity``; sums to ``structural_similarity`` per pair."""
        return self.plan * self.similarity


def part_weights(correlation: torch.Tensor) -> torch.Tensor:
    """Cross-correlation marginal from each part's correlation with the other image's vector.

    correlation: (..., R), ``<x_i, other_vector>`` -> weights: (..., R), ``relu`` normalised to sum
    to 1; uniform 1/R where no part correlates positively. No host-device synchronisation.
    """
    corr = torch.relu(correlation)
    total = corr.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(corr, 1.0 / corr.shape[-1])
    return torch.where(total > 0, corr / total.clamp_min(torch.finfo(corr.dtype).tiny), uniform)


Term = TypeVar("Term", torch.Tensor, float)


def ranking_score(global_similarity: Term, structural_similarity: Term, weight: float) -> Term:
    """The ranking rule: ``global + weight * structural`` (tensors elementwise, or floats)."""
    return global_similarity + weight * structural_similarity


def rerank_positions(score: torch.Tensor, rerank_k: int | torch.Tensor) -> torch.Tensor:
    """The two-stage retrieval rule, for every entry point (evaluation and the service).

    score: (B, K) ranking scores of candidates listed in global order; rerank_k: an int, or
    (B,) one per row -> (B, K) positions into that list: the first ``rerank_k`` sorted by
    score, best first (stable: ties keep the global order), then the rest in global order. A
    candidate to drop scores -inf; past the head a score is never read (it may be -inf).
    """
    positions = torch.arange(score.shape[1], device=score.device)
    heads = torch.as_tensor(rerank_k, device=score.device).reshape(-1, 1)
    # The rest all score -inf, after any head score: the stable sort keeps them in order.
    keys = torch.where(positions < heads, score, float("-inf"))
    return torch.sort(keys, dim=1, descending=True, stable=True).indices


def structural_match(
    query_parts: torch.Tensor,
    query_vector: torch.Tensor,
    candidate_parts: torch.Tensor,
    candidate_vector: torch.Tensor,
    config: MatchingConfig | None = None,
    detach_plan: bool = True,
    fused: bool | None = None,
) -> StructuralMatch:
    """Match each of B queries with its K candidates.

    query_parts: (B, R, D); query_vector: (B, D); candidate_parts: (B, K, P, D);
    candidate_vector: (B, K, D) -> StructuralMatch over (B, K).

    With ``detach_plan`` (the DIML training rule and the default) the plan is a constant and
    gradients reach the features through ``S`` and the global term only. ``fused`` picks the
    Sinkhorn solver (:func:`model.optimal_transport.sinkhorn`; ``None``: the fused kernel on CUDA).
    """
    config = config or MatchingConfig()
    _check_shapes(query_parts, query_vector, candidate_parts, candidate_vector)
    q, qv = query_parts.float(), query_vector.float()
    g, gv = candidate_parts.float(), candidate_vector.float()
    similarity = torch.einsum("brd,bkpd->bkrp", q, g)
    mu = part_weights(torch.einsum("brd,bkd->bkr", q, gv))  # q_i against ḡ
    nu = part_weights(torch.einsum("bkpd,bd->bkp", g, qv))  # g_j against q̄
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_plan):
        result = sinkhorn(
            1.0 - similarity,
            mu,
            nu,
            epsilon=config.epsilon,
            max_iter=config.max_iter,
            tol=config.tol,
            check_every=config.check_every,
            fused=fused,
        )
    structural = (result.plan * similarity).sum(dim=(-2, -1))
    global_sim = torch.einsum("bd,bkd->bk", qv, gv)
    return StructuralMatch(
        similarity=similarity,
        plan=result.plan,
        query_weights=mu,
        candidate_weights=nu,
        structural_similarity=structural,
        global_similarity=global_sim,
        score=ranking_score(global_sim, structural, config.structural_weight),
        marginal_error=result.marginal_error,
        converged=result.converged,
        iterations=result.iterations,
    )


def match_pairs(
    a: Embedding, b: Embedding, config: MatchingConfig | None = None, detach_plan: bool = True
) -> StructuralMatch:
    """Match ``a[i]`` with ``b[i]`` for every i: a, b of length B -> StructuralMatch over (B, 1)."""
    if len(a) != len(b):
        raise ValueError(f"match_pairs needs as many a as b, got {len(a)} and {len(b)}")
    return structural_match(
        a.parts, a.vector, b.parts.unsqueeze(1), b.vector.unsqueeze(1), config, detach_plan
    )


def match_all(
    queries: Embedding,
    gallery: Embedding,
    config: MatchingConfig | None = None,
    detach_plan: bool = True,
) -> StructuralMatch:
    """Every query against every gallery item: B queries, K items -> StructuralMatch over (B, K).

    The gallery is broadcast to every query without copying.
    """
    batch = len(queries)
    parts = gallery.parts.unsqueeze(0).expand(batch, -1, -1, -1)
    vector = gallery.vector.unsqueeze(0).expand(batch, -1, -1)
    return structural_match(queries.parts, queries.vector, parts, vector, config, detach_plan)


def _check_shapes(
    query_parts: torch.Tensor,
    query_vector: torch.Tensor,
    candidate_parts: torch.Tensor,
    candidate_vector: torch.Tensor,
) -> None:
    ok = (
        query_parts.dim() == 3
        and query_vector.dim() == 2
        and candidate_parts.dim() == 4
        and candidate_vector.dim() == 3
    )
    if ok:
        b, _, d = query_parts.shape
        k = candidate_parts.shape[1]
        ok = (
            query_vector.shape == (b, d)
            and candidate_parts.shape[0] == b
            and candidate_parts.shape[3] == d
            and candidate_vector.shape == (b, k, d)
        )
    if not ok:
        raise ValueError(
            "structural_match needs query_parts (B, R, D), query_vector (B, D), "
            "candidate_parts (B, K, P, D), candidate_vector (B, K, D); got "
            f"{tuple(query_parts.shape)}, {tuple(query_vector.shape)}, "
            f"{tuple(candidate_parts.shape)}, {tuple(candidate_vector.shape)}"
        )
