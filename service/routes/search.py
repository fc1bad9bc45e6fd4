"""``POST /search``, ``POST /search/by-id/{id}``, ``POST /search/batch``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Response, UploadFile
from pydantic import StringConstraints

from index_builder import LabelFilter
from service.deps import DIGITS, EngineDep, ItemId, Read, TimerDep, single_parts, within_deadline
from service.engine import Engine, Hit, Page, SearchOptions
from service.errors import ApiError
from service.limits import in_thread
from service.metrics import StageTimer
from service.schemas import BatchSearchResponse, ErrorBody, SearchResponse

router = APIRouter(tags=["search"], dependencies=[Read])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 413, 415, 422, 503)
}

K = Annotated[int, Query(ge=1, le=1000, description="results to return"), DIGITS]
RerankK = Annotated[
    int,
    Query(ge=0, le=1000, description="candidates re-ranked by structural matching; 0 = none"),
    DIGITS,
]
Explain = Annotated[bool, Query(description="attach an explanation to every result")]
Matches = Annotated[
    int, Query(ge=0, le=256, description="strongest part matches per result"), DIGITS
]
MAX_WINDOW = 10_000
Offset = Annotated[
    int,
    Query(
        ge=0,
        le=MAX_WINDOW,
        description="skip this many results of the ranking (paging: the previous page's "
        "next_offset)",
    ),
    DIGITS,
]
MinScore = Annotated[
    float | None,
    Query(
        allow_inf_nan=False,
        description="leave out hits whose score is below this (the score's scale: see score)",
    ),
]
MAX_LABELS = 100
Label = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Labels = Annotated[
    list[Label] | None,
    Query(
        max_length=MAX_LABELS,
        description="only items with one of these labels (repeat the parameter for several)",
    ),
]
ExcludeLabels = Annotated[
    list[Label] | None,
    Query(max_length=MAX_LABELS, description="no items with any of these labels (repeatable)"),
]


def label_filter(label: Labels = None, exclude_label: ExcludeLabels = None) -> LabelFilter:
    return LabelFilter(
        None if label is None else tuple(dict.fromkeys(label)),
        tuple(dict.fromkeys(exclude_label or ())),
    )


Where = Annotated[LabelFilter, Depends(label_filter)]


def search_options(
    where: Where,
    k: K = 10,
    rerank_k: RerankK = 100,
    explain: Explain = True,
    matches: Matches = 5,
    offset: Offset = 0,
    min_score: MinScore = None,
) -> SearchOptions:
    return SearchOptions(k, rerank_k, explain, matches, offset, min_score, where)


Options = Annotated[SearchOptions, Depends(search_options)]


def hit_json(hit: Hit) -> dict[str, Any]:
    """A hit as the API answers it (``SearchHit``)."""
    item = hit.item
    out: dict[str, Any] = {
        "id": item.id,
        "key": item.key,
        "label": item.label,
        "score": hit.score,
        "global_similarity": hit.global_similarity,
        "structural_similarity": hit.structural_similarity,
        "reranked": hit.reranked,
        "global_rank": hit.global_rank,
        "image_url": f"/gallery/{item.id}/image",
    }
    if hit.explanation is not None:
        out["explanation"] = hit.explanation.to_dict(matrices=False)
    return out


def page_json(page: Page, weight: float) -> dict[str, Any]:
    """One query's page as the API answers it (``SearchResponse``)."""
    return {
        "results": [hit_json(h) for h in page.hits],
        "offset": page.offset,
        "next_offset": page.next_offset,
        "structural_weight": weight,
    }


async def _run(
    engine: Engine,
    uploads: list[UploadFile],
    timer: StageTimer,
    options: SearchOptions,
) -> list[Page]:
    with timer.stage("decode"):
        queries = []
        for upload in uploads:
            data = await upload.read()
            queries.append(await in_thread(engine.decode, data, upload.filename or "image"))
    with timer.stage("embed"):
        embedding = await engine.embed(queries, search_next=True)
    geometries = [q.geometry for q in queries]
    return await engine.find(embedding, geometries, options, timer, embedded=True)


@router.post(
    "/search",
    response_model=SearchResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
    dependencies=[single_parts("image")],
)
async def search(
    engine: EngineDep,
    timer: TimerDep,
    response: Response,
    image: Annotated[
        UploadFile, File(description="the query image (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    ],
    options: Options,
) -> dict[str, Any]:
    """The gallery images most like the uploaded one, each with why it matches."""
    results = await within_deadline(engine, _run(engine, [image], timer, options))
    response.headers["Server-Timing"] = timer.header()
    return page_json(results[0], engine.config.matching.structural_weight)


@router.post(
    "/search/batch",
    response_model=BatchSearchResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
)
async def search_batch(
    engine: EngineDep,
    timer: TimerDep,
    response: Response,
    images: Annotated[list[UploadFile], File(description="several query images")],
    options: Options,
) -> dict[str, Any]:
    """Several queries in one request, answered in order."""
    limit = engine.settings.max_batch_images
    if not images or len(images) > limit:
        raise ApiError(422, "invalid_request", f"send between 1 and {limit} images")
    results = await within_deadline(engine, _run(engine, images, timer, options))
    response.headers["Server-Timing"] = timer.header()
    weight = engine.config.matching.structural_weight
    return {"queries": [page_json(page, weight) for page in results]}


@router.post(
    "/search/by-id/{item_id}",
    response_model=SearchResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
)
async def search_by_id(
    item_id: ItemId,
    engine: EngineDep,
    timer: TimerDep,
    response: Response,
    options: Options,
) -> dict[str, Any]:
    """More like this: the gallery item's own stored embedding as the query."""
    embedding, geometry, _ = await in_thread(engine.stored, item_id)
    results = await within_deadline(engine, engine.find(embedding, [geometry], options, timer))
    response.headers["Server-Timing"] = timer.header()
    return page_json(results[0], engine.config.matching.structural_weight)
