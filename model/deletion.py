"""The deletion check: do the parts an explanation names matter more than random ones?

Dropping the query's most contributing parts from the match must lower the structural
similarity more than dropping as many random parts.
"""

from __future__ import annotations

import torch

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
