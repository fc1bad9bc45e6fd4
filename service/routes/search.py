"""``POST /search``, ``POST /search/by-id/{id}``, ``POST /search/batch``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Response, UploadFile

from service.deps import DIGITS, EngineDep, ItemId, Read, TimerDep, single_parts, within_deadline
from service.engine import Engine, Hit, SearchOptions
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


def search_options(
    k: K = 10, rerank_k: RerankK = 100, explain: Explain = True, matches: Matches = 5
) -> SearchOptions:
    return SearchOptions(k, rerank_k, explain, matches)


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


async def _run(
    engine: Engine,
    uploads: list[UploadFile],
    timer: StageTimer,
    options: SearchOptions,
) -> list[list[Hit]]:
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
    return {"results": [hit_json(h) for h in results[0]]}


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
    return {"queries": [{"results": [hit_json(h) for h in r]} for r in results]}


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
    return {"results": [hit_json(h) for h in results[0]]}
