"""Keypoint transfer (CUB): does the flow carry a part of one bird to the same part of another?

Each keypoint visible in a query and in one of its (up to 3) highest re-ranked same-class
candidates is carried from its query cell to a candidate cell, and is correct within
``alpha * max(box width, height)`` of the same part in the candidate (PCK). Carried by the flow
(the cell with the most flow, and the flow-weighted mean of the cell centres), by
nearest-feature matching (argmax of S) and by the identity (the same cell). Geometry rows are
:meth:`model.preprocessing.ImageGeometry.row`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model.config import MatchingConfig
from model.datasets import ImageSet
from model.matching import match_pairs
from model.network import Embedding
from model.preprocessing import GEOMETRY_COLUMNS

PCK_ALPHAS = (0.1, 0.2)
PCK_CANDIDATES = 3
COLUMN = {name: i for i, name in enumerate(GEOMETRY_COLUMNS)}


def take(embedding: Embedding, index: torch.Tensor) -> Embedding:
    """The rows ``index`` of ``embedding`` in float32 (stored parts may be float16)."""
    return embedding[index].to(embedding.vector.device, torch.float32)


def same_class_pairs(
    order: torch.Tensor, labels: torch.Tensor, top: int, per_query: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, candidate) index pairs: each query's first ``per_query`` same-class candidates
    among the first ``top`` of its ranking."""
    head = order[:, :top]
    same = labels[head] == labels[:, None]
    keep = same & (same.cumsum(dim=1) <= per_query)
    queries, slots = keep.nonzero(as_tuple=True)
    return queries, head[queries, slots]


def cell_centres(geometry: torch.Tensor, grid: int) -> torch.Tensor:
    """(P, 5) geometry rows -> (P, R, 2) pixel centres of the grid cells, row-major."""
    left, top, size = (geometry[:, COLUMN[name]][:, None] for name in ("left", "top", "size"))
    steps = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    x = left + size * cols.reshape(1, -1)
    y = top + size * rows.reshape(1, -1)
    return torch.stack([x, y], dim=-1)


def keypoint_cells(keypoints: torch.Tensor, geometry: torch.Tensor, grid: int) -> torch.Tensor:
    """(P, K, 3) keypoints (x, y, visible), (P, 5) geometry -> (P, K) cell index, -1 outside
    the crop."""
    left, top, size = (geometry[:, COLUMN[name]][:, None] for name in ("left", "top", "size"))
    u = (keypoints[..., 0] - left) / size
    v = (keypoints[..., 1] - top) / size
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    cell = (v * grid).floor().clamp(0, grid - 1) * grid + (u * grid).floor().clamp(0, grid - 1)
    return torch.where(inside, cell.long(), torch.full_like(cell, -1).long())


def transfer_keypoints(
    plan: torch.Tensor,
    similarity: torch.Tensor,
    query_keypoints: torch.Tensor,
    query_geometry: torch.Tensor,
    candidate_keypoints: torch.Tensor,
    candidate_geometry: torch.Tensor,
    candidate_boxes: torch.Tensor,
    grid: int,
    alphas: Sequence[float] = PCK_ALPHAS,
) -> dict[str, Any]:
    """PCK of carrying each query keypoint to the candidate, for P pairs.

    plan, similarity: (P, R, R); keypoints: (P, K, 3); geometry: (P, 5); candidate_boxes:
    (P, 4) as ``x, y, w, h``. A keypoint counts when visible in both images and inside the
    query's crop. -> {"alpha", "flow", "flow_mean", "nearest", "identity", "n_keypoints"}.
    """
    cells = keypoint_cells(query_keypoints, query_geometry, grid)  # (P, K)
    counted = (cells >= 0) & (query_keypoints[..., 2] > 0) & (candidate_keypoints[..., 2] > 0)
    safe = cells.clamp_min(0)
    centres = cell_centres(candidate_geometry, grid)  # (P, R, 2)

    def rows_of(matrix: torch.Tensor) -> torch.Tensor:  # (P, R, R) -> (P, K, R)
        return torch.gather(matrix, 1, safe[..., None].expand(-1, -1, matrix.shape[-1]))

    def at_cells(target: torch.Tensor) -> torch.Tensor:  # (P, K) cell -> (P, K, 2) pixels
        return torch.gather(centres, 1, target[..., None].expand(-1, -1, 2))

    flow_rows = rows_of(plan)
    weights = flow_rows / flow_rows.sum(-1, keepdim=True).clamp_min(1e-30)
    predictions = {
        "flow": at_cells(flow_rows.argmax(-1)),
        "flow_mean": weights @ centres,
        "nearest": at_cells(rows_of(similarity).argmax(-1)),
        "identity": at_cells(safe),
    }
    truth = candidate_keypoints[..., :2]
    scale = candidate_boxes[:, 2:4].amax(dim=1)[:, None]  # (P, 1)
    n = int(counted.sum())
    out: dict[str, Any] = {"alpha": list(alphas), "n_keypoints": n}
    for name, predicted in predictions.items():
        error = (predicted - truth).norm(dim=-1) / scale  # (P, K) in box sizes
        out[name] = [100.0 * float(((error <= a) & counted).sum()) / max(n, 1) for a in alphas]
    return out


def keypoint_report(
    images: ImageSet,
    embedding: Embedding,
    geometry: torch.Tensor,
    order: torch.Tensor,
    top: int,
    grid: int,
    matching: MatchingConfig | None = None,
) -> dict[str, Any]:
    """PCK over each query and its (up to 3) highest re-ranked same-class candidates."""
    labels = images.labels
    queries, candidates = same_class_pairs(order, labels, top, PCK_CANDIDATES)
    keypoints = torch.stack([r.keypoints for r in images.records if r.keypoints is not None])
    boxes = torch.tensor([r.box for r in images.records if r.box is not None])
    plans, sims = [], []
    for a in range(0, len(queries), 4096):
        q, c = queries[a : a + 4096], candidates[a : a + 4096]
        match = match_pairs(take(embedding, q), take(embedding, c), matching)
        plans.append(match.plan[:, 0])
        sims.append(match.similarity[:, 0])
    return transfer_keypoints(
        torch.cat(plans),
        torch.cat(sims),
        keypoints[queries],
        geometry[queries],
        keypoints[candidates],
        geometry[candidates],
        boxes[candidates],
        grid,
    )
