"""Search results as the API answers them (``SearchResponse``, ``SearchHit``): plain dicts
that the routes validate against the schemas."""

from __future__ import annotations

from typing import Any

from model import MatchingConfig
from model.explain import ranking_rule, verdict_of
from service.limits import check_deadline
from service.search import Hit, Page


def hit_json(hit: Hit, matching: MatchingConfig) -> dict[str, Any]:
    """A hit as the API answers it (``SearchHit``); its verdict is that of its score against
    the query (an example search's: against the positive it matches best). Past the request's
    deadline it raises instead: a long answer stops between two hits."""
    check_deadline()
    item = hit.item
    pair_score = hit.score if hit.pair_score is None else hit.pair_score
    out: dict[str, Any] = {
        "id": item.id,
        "key": item.key,
        "label": item.label,
        "score": hit.score,
        "global_similarity": hit.global_similarity,
        "structural_similarity": hit.structural_similarity,
        "reranked": hit.reranked,
        "global_rank": hit.global_rank,
        "verdict": verdict_of(pair_score, matching),
        "image_url": f"/gallery/{item.id}/image",
    }
    if hit.explanation is not None:
        out["explanation"] = hit.explanation.to_dict(matrices=False)
    if hit.positive is not None:
        out["positive"] = hit.positive
    return out


def page_json(page: Page, matching: MatchingConfig) -> dict[str, Any]:
    """One query's page as the API answers it (``SearchResponse``), with the rule that ranked
    it (the model's structural weight)."""
    results = [hit_json(h, matching) for h in page.hits]
    verdicts = [r["verdict"] for r in results]
    out: dict[str, Any] = {
        "results": results,
        "offset": page.offset,
        "next_offset": page.next_offset,
        "structural_weight": matching.structural_weight,
        "ranked_by": ranking_rule(matching.structural_weight),
        "nothing_close": None if None in verdicts else "close" not in verdicts,
    }
    if page.groups is not None:
        out["groups"] = [
            {"label": label, "results": [hit_json(h, matching) for h in hits]}
            for label, hits in page.groups
        ]
    return out
