"""``GET /duplicates``: groups of near-copies in the gallery, paged."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Query

from index_builder.duplicates import GLOBAL_THRESHOLD, STRUCTURAL_THRESHOLD
from service.deps import DIGITS, EngineDep, Read, within_deadline
from service.limits import in_thread
from service.routes.gallery import item_json
from service.routes.search import ERRORS
from service.schemas import DuplicatesPage

router = APIRouter(tags=["search"], dependencies=[Read], responses=ERRORS)
# A group can hold most of a gallery (at a low threshold): its answer is cut to its smallest
# ids and its most alike pairs, and says how many it has (``size``, ``pair_count``).
GROUP_ITEMS = 100
GROUP_PAIRS = 100


@router.get("/duplicates", response_model=DuplicatesPage)
async def duplicates(
    engine: EngineDep,
    threshold: Annotated[
        float,
        Query(
            ge=-1,
            le=1,
            allow_inf_nan=False,
            description="least global similarity of two near-copies",
        ),
    ] = GLOBAL_THRESHOLD,
    structural_threshold: Annotated[
        float,
        Query(
            ge=-1,
            le=1,
            allow_inf_nan=False,
            description="least structural similarity that confirms them",
        ),
    ] = STRUCTURAL_THRESHOLD,
    offset: Annotated[int, Query(ge=0, le=10_000_000), DIGITS] = 0,
    limit: Annotated[int, Query(ge=1, le=200), DIGITS] = 20,
) -> dict[str, Any]:
    """Groups of gallery items that are near-copies of each other (crops, mirrors, rescales,
    re-encodings), largest first, each with its pairs' similarities (at most 100 items, the
    smallest ids, and 100 pairs, the most alike, per group; ``size`` and ``pair_count`` count
    them all). Each item's 16 nearest neighbours by the global vector propose pairs, the
    structural match confirms them: each pair is matched once and kept until the gallery
    changes, so other thresholds and later pages are immediate. Every threshold in [-1, 1]
    gives the groups of matching every proposed pair afresh; the first time a lower one is
    asked, the pairs between it and the lowest asked before are matched (at most each item's
    16 pairs in all), while other requests go on. A 503 past the deadline keeps what was
    matched: asking again goes on from there."""
    work = engine.duplicates(threshold, structural_threshold)
    groups = await within_deadline(engine, work)
    page = groups.page(offset, limit, GROUP_ITEMS, GROUP_PAIRS)
    items = await in_thread(engine.items, [i for g in page for i in g.ids])
    return {
        "groups": [
            {
                "items": [item_json(items[i]) for i in g.ids if i in items],
                "pairs": [dataclasses.asdict(p) for p in g.pairs],
                "size": g.size,
                "pair_count": g.pair_count,
            }
            for g in page
        ],
        "total": len(groups),
        "offset": offset,
        "limit": limit,
        "threshold": threshold,
        "structural_threshold": structural_threshold,
    }
