"""The deletion checks: do the regions an explanation names matter more than random ones?

- :func:`deletion_check`, in the embedding: dropping the query's most contributing parts from
  the match must lower the structural similarity more than dropping as many random parts;
- :func:`ranking_score_deletion`, in the image: greying out the query's regions of largest
  total contribution to the whole ranking score (the explanation's ``query.total``) and
  embedding the image again must lower the score more than greying out as many random regions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from model.attribution import global_contributions
from model.config import MatchingConfig
from model.keypoints import take
from model.matching import match_pairs
from model.network import Embedding

DELETED_PARTS = 3


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
        q = take(embedding, queries[start : start + chunk])
        c = take(embedding, candidates[start : start + chunk])
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


def pixel_cells(grid: int, size: int) -> torch.Tensor:
    """(size, size) long: the grid cell (row-major, 0..R-1) of each pixel of a ``size x size``
    model input, by the pixel's centre: row ``floor((y + 0.5) * grid / size)``, likewise the
    column. These are the cells of :meth:`~model.preprocessing.ImageGeometry.cell_boxes` in the
    crop."""
    if grid < 1 or size < grid:
        raise ValueError(f"pixel_cells needs 1 <= grid <= size, got grid={grid}, size={size}")
    line = ((2 * torch.arange(size) + 1) * grid) // (2 * size)  # (size,)
    return line[:, None] * grid + line[None, :]


def grey_cells(pixels: torch.Tensor, cells: torch.Tensor, grid: int) -> torch.Tensor:
    """pixels: (B, 3, S, S), normalised model input; cells: (B, k) cell indices -> (B, 3, S, S):
    a copy with every pixel of those cells set to 0, which after normalisation is the
    preprocessing's mean colour (the ImageNet mean by default), in all three channels."""
    if pixels.dim() != 4 or pixels.shape[2] != pixels.shape[3] or cells.dim() != 2:
        raise ValueError(
            f"grey_cells needs pixels (B, 3, S, S) and cells (B, k), got "
            f"{tuple(pixels.shape)} and {tuple(cells.shape)}"
        )
    where = pixel_cells(grid, pixels.shape[-1]).to(pixels.device)  # (S, S)
    inside = (where[None, None] == cells.to(pixels.device)[..., None, None]).any(dim=1)
    return pixels.masked_fill(inside[:, None], 0.0)


def query_region_totals(
    query: Embedding, results: Embedding, grid: int, matching: MatchingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query region's share of the whole ranking score, for B pairs at once.

    query: B embeddings with ``maps`` (B, D, h, w); results: B embeddings (``results[i]`` is
    the hit of ``query[i]``) -> (totals (B, R) float64, score (B,) float32), where
    ``totals = global_contributions(maps, result vectors) + w * row sums of T ⊙ S``, what
    :func:`model.explain.explain` reports as ``query.total`` and sums (to float precision) to
    ``score = ranking_score(global, structural, w)``."""
    if query.maps is None:
        raise ValueError("query_region_totals needs the queries' projected maps (keep_maps)")
    config = matching or MatchingConfig()
    results = results.to(query.vector.device)
    match = match_pairs(query.without_maps(), results, config)
    structural = (match.plan[:, 0].double() * match.similarity[:, 0].double()).sum(dim=-1)
    global_ = global_contributions(query.maps, results.vector.float(), grid)
    return global_ + config.structural_weight * structural, match.score[:, 0]


def ranking_score_deletion(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    embed: Callable[[torch.Tensor, bool], Embedding],
    results: Embedding,
    grid: int,
    matching: MatchingConfig | None = None,
    parts: int = DELETED_PARTS,
    seed: int = 0,
) -> dict[str, float | int]:
    """The deletion check of the whole ranking score, in the image domain.

    batches: (pixels (B, 3, S, S) of queries, normalised model input; hits (B,) indices into
    ``results``); embed: (pixels, keep_maps) -> Embedding, the model's embedder
    (:meth:`model.pipeline.Embedder.embed_pixels`); results: the stored embeddings of the hits.

    Each query is embedded with its map; its ``parts`` regions of largest total contribution
    to the score of its pair (:func:`query_region_totals`, the explanation's ``query.total``),
    or ``parts`` random ones (a generator seeded by ``seed``, drawn batch after batch), are
    greyed out in the pixels (:func:`grey_cells`); both masked queries are embedded again (in
    one batch) and scored against the same hit by the same rule. Drops are in percent of the
    summed original scores: ``100 * sum(base - masked) / sum(base)``, as in
    :func:`deletion_check`.
    """
    config = matching or MatchingConfig()
    generator = torch.Generator().manual_seed(seed)
    base_sum, top_sum, random_sum, pairs = 0.0, 0.0, 0.0, 0
    for pixels, hits in batches:
        b = len(pixels)
        hit = results[hits]
        query = embed(pixels, True)
        totals, base = query_region_totals(query, hit, grid, config)
        top = totals.argsort(dim=1, descending=True, stable=True)[:, :parts].cpu()
        random = torch.rand(totals.shape, generator=generator).argsort(dim=1)[:, :parts]
        masked = torch.cat([grey_cells(pixels, top, grid), grey_cells(pixels, random, grid)])
        scores = match_pairs(
            embed(masked, False), Embedding.cat([hit, hit]).to(query.vector.device), config
        ).score[:, 0]  # (2B,)
        base_sum += float(base.sum())
        top_sum += float(scores[:b].sum())
        random_sum += float(scores[b:].sum())
        pairs += b
    if pairs == 0:
        raise ValueError("ranking_score_deletion needs at least one pair")
    return {
        "top_drop": 100.0 * (base_sum - top_sum) / base_sum,
        "random_drop": 100.0 * (base_sum - random_sum) / base_sum,
        "pairs": pairs,
    }
