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
    re-encodings), largest first, each with its pairs' similarities. Found by a nearest-
    neighbour search on the global vectors, confirmed by the structural match; the answer is
    kept until the gallery changes, so later pages are immediate."""
    work = in_thread(engine.duplicates, threshold, structural_threshold)
    groups = await within_deadline(engine, work)
    page = groups[offset : offset + limit]
    items = await in_thread(engine.items, [i for g in page for i in g.ids])
    return {
        "groups": [
            {
                "items": [item_json(items[i]) for i in g.ids if i in items],
                "pairs": [dataclasses.asdict(p) for p in g.pairs],
            }
            for g in page
        ],
        "total": len(groups),
        "offset": offset,
        "limit": limit,
        "threshold": threshold,
        "structural_threshold": structural_threshold,
    }
