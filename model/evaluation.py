"""Evaluation on a labelled image set: every image queries all the others.

- retrieval: Recall@K, R-Precision and MAP@R of the global ranking and of the same ranking with
  its top-K re-ranked by structural matching (``score = SS + <q̄, ḡ>``);
- keypoint transfer (CUB): each keypoint visible in a query and in one of its (up to 3) highest
  re-ranked same-class candidates is carried from its query cell to a candidate cell, and is
  correct within ``alpha * max(box width, height)`` of the same part in the candidate (PCK).
  Carried by the flow (the cell with the most flow, and the flow-weighted mean of the cell
  centres), by nearest-feature matching (argmax of S) and by the identity (the same cell);
- deletion: dropping the query's 3 most contributing parts from the match must lower the
  structural similarity more than dropping 3 random parts.

Everything is batched; the all-pairs global similarity is computed in chunks of queries, so a
set of SOP's size (60k images) fits in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from model.config import MatchingConfig, Preprocessing
from model.datasets import ImageSet, Record
from model.images import geometry_of, load_for_model, load_image
from model.matching import match_pairs, ranking_score, rerank_positions, structural_match
from model.metrics import RECALL_KS, relevant_counts, retrieval_metrics
from model.network import Embedding, EmbeddingNet
from model.pipeline import Embedder
from model.runtime import Runtime

PCK_ALPHAS = (0.1, 0.2)
PUBLISHED_WEIGHT = 1.0  # the structural weight of the published ranking rule
PCK_CANDIDATES = 3
DELETED_PARTS = 3


class ImageFiles(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Records -> (pixels (3, crop, crop), geometry (5,) = width, height, left, top, size).

    ``transform`` (a PIL image -> pixels) replaces the test-time preprocessing when given
    (training augmentations); the geometry is then that of the test-time crop.
    """

    def __init__(
        self,
        records: Sequence[Record],
        spec: Preprocessing,
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.records = records
        self.spec = spec
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.records[index].path  # errors name the file
        if self.transform is None:
            loaded = load_for_model(path, self.spec, max_aspect=None)
            pixels, g = loaded.pixels, loaded.geometry
        else:
            image = load_image(path)
            pixels, g = self.transform(image), geometry_of(image.width, image.height, self.spec)
        return pixels, torch.tensor([g.width, g.height, g.left, g.top, g.size])


def batches(
    records: Sequence[Record], spec: Preprocessing, batch_size: int, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded batches of ``records`` at test-time preprocessing, in order."""
    yield from DataLoader(ImageFiles(records, spec), batch_size=batch_size, num_workers=workers)


@torch.inference_mode()
def embed_records(
    model: EmbeddingNet,
    records: Sequence[Record],
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
    runtime: Runtime = "torch",
) -> tuple[Embedding, torch.Tensor]:
    """Embed every record at test-time preprocessing -> (Embedding on CPU, geometry rows (N, 5)).

    Parts are kept in float16 (as the index stores them) to halve the memory of large sets.
    ``runtime``: the :class:`~model.pipeline.Embedder`'s (``torch`` for a model in training).
    """
    embedder = Embedder(model, device, half=device.type == "cuda", runtime=runtime)
    parts, vectors, rows = [], [], []
    for pixels, geometry in batches(records, model.config.preprocessing, batch_size, workers):
        embedding = embedder.embed_pixels(pixels)
        parts.append(embedding.parts.half().cpu())
        vectors.append(embedding.vector.float().cpu())
        rows.append(geometry)
        if progress is not None:
            progress(len(pixels))
    return Embedding(torch.cat(parts), torch.cat(vectors)), torch.cat(rows)


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
    orders = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sims = vectors[start:stop] @ vectors.T  # (b, N)
        rows = torch.arange(stop - start, device=device)
        sims[rows, rows + start] = -torch.inf
        orders.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth])
    order = torch.cat(orders).cpu()
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
    left, top, size = geometry[:, 2:3], geometry[:, 3:4], geometry[:, 4:5]
    steps = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    x = left + size * cols.reshape(1, -1)
    y = top + size * rows.reshape(1, -1)
    return torch.stack([x, y], dim=-1)


def keypoint_cells(keypoints: torch.Tensor, geometry: torch.Tensor, grid: int) -> torch.Tensor:
    """(P, K, 3) keypoints (x, y, visible), (P, 5) geometry -> (P, K) cell index, -1 outside
    the crop."""
    left, top, size = geometry[:, None, 2], geometry[:, None, 3], geometry[:, None, 4]
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
        match = match_pairs(_take(embedding, q), _take(embedding, c), matching)
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


def deletion_check(
    embedding: Embedding,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    matching: MatchingConfig | None = None,
    parts: int = DELETED_PARTS,
    seed: int = 0,
    chunk: int = 2048,
) -> dict[str, float]:
    """Drop of the structural similarity when the query's ``parts`` most contributing parts
    (row sums of ``T ⊙ S``), or ``parts`` random ones, leave the match; in percent of the
    mean structural similarity, over the pairs ``embedding[queries[i]]``,
    ``embedding[candidates[i]]``. Global vectors are kept (the image is the same). Pairs are
    gathered ``chunk`` at a time (and converted to float32 per chunk)."""
    generator = torch.Generator().manual_seed(seed)
    base_sum, top_sum, random_sum = 0.0, 0.0, 0.0
    for start in range(0, len(queries), chunk):
        q = _take(embedding, queries[start : start + chunk])
        c = _take(embedding, candidates[start : start + chunk])
        full = match_pairs(q, c, matching)
        contribution = full.contributions[:, 0].sum(dim=-1)  # (P, R)
        random_rank = torch.rand(contribution.shape, generator=generator).argsort(dim=1)
        base_sum += float(full.structural_similarity.sum())
        for ranking, is_top in (
            (contribution.argsort(dim=1, descending=True), True),
            (random_rank.to(contribution.device), False),
        ):
            kept = ranking[:, parts:].sort(dim=1).values  # (P, R - parts)
            index = kept[..., None].expand(-1, -1, q.parts.shape[-1])
            masked = Embedding(torch.gather(q.parts, 1, index), q.vector)
            ss = float(match_pairs(masked, c, matching).structural_similarity.sum())
            if is_top:
                top_sum += ss
            else:
                random_sum += ss
    return {
        "top_parts_drop": 100.0 * (base_sum - top_sum) / base_sum,
        "random_parts_drop": 100.0 * (base_sum - random_sum) / base_sum,
    }


def _take(embedding: Embedding, index: torch.Tensor) -> Embedding:
    return Embedding(embedding.parts[index].float(), embedding.vector[index].float())


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
) -> dict[str, Any]:
    """The full report (see the module docstring) as a JSON-ready dict, percentages 0-100."""
    device = device or torch.device("cpu")
    started = time.perf_counter()
    embedding, geometry = embed_records(
        model, images.records, device, batch_size, workers, progress, runtime
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
    if keypoints and geometry is not None and images.has_keypoints:
        report["pck"] = keypoint_report(
            images, embedding, geometry, rankings.reranked_order, rankings.rerank_k, grid, matching
        )
    if deletion:
        queries = torch.arange(len(embedding))
        top1 = rankings.reranked_order[:, 0]
        report["deletion"] = deletion_check(embedding, queries, top1, matching)
    return report
