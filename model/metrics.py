"""Retrieval metrics from ranked labels: Recall@K, R-Precision and MAP@R.

Every query's own image is left out of its ranking *and* of its relevant set: a query with
``n`` images of its class in the set has ``R = n - 1`` relevant items (the published DIML code
counts the query itself, which inflates both R-based metrics). Queries with ``R = 0`` have
nothing to find and are left out of every metric. Ranks are whatever order the caller gives;
the evaluation sorts with a stable sort, so tied scores keep the data set's order.
"""

from __future__ import annotations

import torch

RECALL_KS = (1, 2, 4, 8)


def retrieval_metrics(
    ranked_labels: torch.Tensor,
    query_labels: torch.Tensor,
    n_relevant: torch.Tensor,
    ks: tuple[int, ...] = RECALL_KS,
) -> dict[str, float]:
    """Percentages (0-100) averaged over the queries that have something to find.

    ranked_labels: (Q, L) labels of each query's ranking, best first, the query excluded;
    L must be at least ``max(ks)`` and the largest R. query_labels: (Q,); n_relevant: (Q,),
    each query's R. -> ``{"recall@1", ..., "r_precision", "map@r"}``.
    """
    if ranked_labels.dim() != 2 or ranked_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(
            f"ranked_labels must be (Q, L) with Q = {query_labels.shape[0]}, "
            f"got {tuple(ranked_labels.shape)}"
        )
    keep = n_relevant > 0
    hits = (ranked_labels[keep] == query_labels[keep, None]).float()  # (Q', L)
    r = n_relevant[keep].long()
    depth = hits.shape[1]
    needed = max(max(ks), int(r.max()) if r.numel() else 0)
    if depth < needed:
        raise ValueError(f"rankings are {depth} deep but the metrics need {needed}")
    if hits.shape[0] == 0:
        raise ValueError("no query has another image of its class to find")
    out = {f"recall@{k}": 100.0 * hits[:, :k].amax(dim=1).mean().item() for k in ks}
    positions = torch.arange(1, depth + 1, dtype=torch.float32)
    within_r = positions[None, :] <= r[:, None]  # (Q', L): the first R ranks
    relevant_in_r = hits * within_r
    out["r_precision"] = 100.0 * (relevant_in_r.sum(1) / r).mean().item()
    precision_at = hits.cumsum(1) / positions  # P(i)
    out["map@r"] = 100.0 * ((precision_at * relevant_in_r).sum(1) / r).mean().item()
    return out


def relevant_counts(labels: torch.Tensor, query_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Each query's R: images of its class in ``labels`` minus the query itself."""
    query_labels = labels if query_labels is None else query_labels
    classes, counts = torch.unique(labels, return_counts=True)
    index = torch.searchsorted(classes, query_labels)
    return counts[index] - 1
