"""Search results as the API answers them: the response models of :mod:`service.schemas` (the
one declaration of each answer's shape), filled in field by field. A field left out stays
unset and out of the JSON (the routes answer with ``exclude_unset``)."""

from __future__ import annotations

from model import MatchingConfig
from model.explain import ranking_rule, verdict_of
from service import schemas
from service.limits import check_deadline
from service.search import Hit, Page


def hit_out(hit: Hit, matching: MatchingConfig) -> schemas.Hit:
    """A hit as the API answers it (an ``ExampleHit`` when it matched a positive example); its
    verdict is that of its score against the query (an example search's: against the positive
    it matches best). Past the request's deadline it raises instead: a long answer stops
    between two hits."""
    check_deadline()
    item = hit.item
    pair_score = hit.score if hit.pair_score is None else hit.pair_score
    optional: dict[str, object] = {}  # what is not given stays unset: out of the answer
    if hit.explanation is not None:
        optional["explanation"] = hit.explanation.to_dict(matrices=False)
    if hit.positive is not None:
        optional["positive"] = hit.positive
    schema = schemas.Hit if hit.positive is None else schemas.ExampleHit
    return schema(
        id=item.id,
        key=item.key,
        label=item.label,
        score=hit.score,
        global_similarity=hit.global_similarity,
        structural_similarity=hit.structural_similarity,
        reranked=hit.reranked,
        global_rank=hit.global_rank,
        verdict=verdict_of(pair_score, matching),
        image_url=f"/gallery/{item.id}/image",
        **optional,
    )


def page_out(
    page: Page,
    matching: MatchingConfig,
    schema: type[schemas.SearchResponse] = schemas.SearchResponse,
) -> schemas.SearchResponse:
    """One query's page as the API answers it (``schema``: ``ExamplesResponse`` for an example
    search), with the rule that ranked it (the model's structural weight)."""
    results = [hit_out(h, matching) for h in page.hits]
    verdicts = [r.verdict for r in results]
    out = schema(
        results=results,
        offset=page.offset,
        next_offset=page.next_offset,
        structural_weight=matching.structural_weight,
        ranked_by=ranking_rule(matching.structural_weight),
        nothing_close=None if None in verdicts else "close" not in verdicts,
    )
    if page.groups is not None:
        out.groups = [
            schemas.GroupOut(label=label, results=[hit_out(h, matching) for h in hits])
            for label, hits in page.groups
        ]
    return out
