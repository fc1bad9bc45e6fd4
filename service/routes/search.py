"""``POST /search``, ``POST /search/by-id/{id}``, ``POST /search/batch``,
``POST /search/examples``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Query, Response, UploadFile
from pydantic import Field, StringConstraints

from index_builder import LabelFilter
from index_builder.limits import MAX_LABEL_LENGTH
from service.budget import check_search
from service.deps import (
    DIGITS,
    MAX_ID,
    EngineDep,
    ItemId,
    Read,
    TimerDep,
    answer,
    single_parts,
)
from service.engine import Engine
from service.errors import ApiError
from service.limits import in_thread
from service.metrics import StageTimer
from service.responses import page_out
from service.routing import ITEM_ID
from service.schemas import BatchSearchResponse, ErrorBody, ExamplesResponse, SearchResponse
from service.search import Page, SearchOptions
from service.writes import Uploads

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
Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_LENGTH)]
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


GroupBy = Annotated[
    Literal["label"] | None,
    Query(description="group the hits by label: k groups, each with its best group_size hits; "
          "offsets then count groups"),
]  # fmt: skip
GroupSize = Annotated[
    int, Query(ge=1, le=100, description="hits per group (with group_by)"), DIGITS
]
MAX_GROUPED_HITS = 1000
# Explaining a hit may embed its gallery picture again (its global basis, when not cached): the
# hits explained per query are bounded, as the hits returned are.
MAX_EXPLAINED_HITS = 100


def ranking_options(
    where: Where,
    k: K = 10,
    rerank_k: RerankK = 100,
    explain: Explain = True,
    matches: Matches = 5,
    offset: Offset = 0,
    min_score: MinScore = None,
) -> SearchOptions:
    """What every search takes (an example search takes only these: no grouping)."""
    _check_explained(k, explain)
    return SearchOptions(k, rerank_k, explain, matches, offset, min_score, where)


ExampleOptions = Annotated[SearchOptions, Depends(ranking_options)]


def search_options(
    ranking: ExampleOptions, group_by: GroupBy = None, group_size: GroupSize = 3
) -> SearchOptions:
    """A search's options: the ranking's, grouped by label or not."""
    if group_by != "label":
        return ranking
    if ranking.k * group_size > MAX_GROUPED_HITS:
        raise ApiError(422, "invalid_request", f"k x group_size may be at most "
                       f"{MAX_GROUPED_HITS}, not {ranking.k} x {group_size}")  # fmt: skip
    _check_explained(ranking.k * group_size, ranking.explain)
    return dataclasses.replace(ranking, group_size=group_size)


Options = Annotated[SearchOptions, Depends(search_options)]


def _check_explained(hits: int, explain: bool) -> None:
    if explain and hits > MAX_EXPLAINED_HITS:
        raise ApiError(422, "invalid_request", f"with explain=true at most {MAX_EXPLAINED_HITS} "
                       f"hits are explained per query, not {hits}: ask for fewer (k, or "
                       "k x group_size), page on with offset, or set explain=false")  # fmt: skip


async def _run(
    engine: Engine, uploads: list[UploadFile], timer: StageTimer, options: SearchOptions
) -> list[Page]:
    queries = await engine.decode_all(await _read(uploads), timer)
    grouped = options.group_size is not None
    with timer.stage("embed"):
        embedding = await engine.embed(queries, search_next=not grouped)
    geometries = [q.geometry for q in queries]
    return await engine.search(embedding, geometries, options, timer, embedded=not grouped)


async def _read(uploads: list[UploadFile]) -> Uploads:
    """Each upload's file name and bytes."""
    return [(u.filename or "image", await u.read()) for u in uploads]


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
    image: Annotated[
        UploadFile, File(description="the query image (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    ],
    options: Options,
) -> Response:
    """The gallery images most like the uploaded one, each with why it matches."""
    check_search(options, engine.config.grid)
    work = _run(engine, [image], timer, options)
    return await answer(engine, timer, SearchResponse, work, _first_page(engine))


@router.post(
    "/search/batch",
    response_model=BatchSearchResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
)
async def search_batch(
    engine: EngineDep,
    timer: TimerDep,
    images: Annotated[list[UploadFile], File(description="several query images")],
    options: Options,
) -> Response:
    """Several queries in one request, answered in order."""
    limit = engine.settings.max_batch_images
    if not images or len(images) > limit:
        raise ApiError(422, "invalid_request", f"send between 1 and {limit} images")
    check_search(options, engine.config.grid, len(images))
    matching = engine.config.matching

    def queries(pages: list[Page]) -> BatchSearchResponse:
        return BatchSearchResponse(queries=[page_out(page, matching) for page in pages])

    work = _run(engine, images, timer, options)
    return await answer(engine, timer, BatchSearchResponse, work, queries)


@router.post(
    f"/search/by-id/{ITEM_ID}",
    response_model=SearchResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
)
async def search_by_id(
    item_id: ItemId,
    engine: EngineDep,
    timer: TimerDep,
    options: Options,
) -> Response:
    """More like this: the gallery item's own stored embedding as the query."""
    check_search(options, engine.config.grid)

    async def run() -> list[Page]:
        if not options.explain:
            embedding, geometry, _ = await in_thread(engine.stored, item_id)
            return await engine.search(embedding, [geometry], options, timer)
        embedding, geometry, _, basis = await engine.stored_query(item_id)
        return await engine.search(embedding, [geometry], options, timer, stored=[basis])

    return await answer(engine, timer, SearchResponse, run(), _first_page(engine))


def _first_page(engine: Engine) -> Callable[[list[Page]], SearchResponse]:
    """What builds the answer to one query (``SearchResponse``) from its list of pages."""
    matching = engine.config.matching
    return lambda pages: page_out(pages[0], matching)


ExampleIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_ID), DIGITS]] | None,
    Query(max_length=64, description="gallery ids (repeat the parameter for several)"),
]
ExampleFiles = Annotated[list[UploadFile], File(description="example images (repeatable)")]


@router.post(
    "/search/examples",
    response_model=ExamplesResponse,
    response_model_exclude_unset=True,
    responses=ERRORS,
)
async def search_examples(
    engine: EngineDep,
    timer: TimerDep,
    options: ExampleOptions,
    positive: ExampleFiles = [],  # noqa: B006  (FastAPI copies defaults per request)
    negative: ExampleFiles = [],  # noqa: B006
    positive_id: ExampleIds = None,
    negative_id: ExampleIds = None,
) -> Response:
    """More like the positive examples, less like the negative ones; each an upload or a
    gallery id. A candidate's score is its best score against the positives less its best
    against the negatives (each score global + w x structural); candidates are the union
    of each positive's top rerank_k by the global vector, the examples from the gallery left
    out. Each hit explains its match with the positive it matches best (``positive``: its
    position among the positives, uploads first, then ids)."""
    positive_ids, negative_ids = positive_id or [], negative_id or []
    total = len(positive) + len(negative) + len(positive_ids) + len(negative_ids)
    limit = engine.settings.max_batch_images
    if not positive and not positive_ids:
        raise ApiError(422, "invalid_request", "give at least one positive example: a "
                       "'positive' image or a 'positive_id'")  # fmt: skip
    if total > limit:
        raise ApiError(422, "invalid_request", f"give at most {limit} examples, not {total}")
    check_search(options, engine.config.grid)

    async def run() -> Page:
        pos, neg = (await _read(positive), positive_ids), (await _read(negative), negative_ids)
        return await engine.search_examples(pos, neg, options, timer)

    matching = engine.config.matching
    answer_page = functools.partial(page_out, matching=matching, schema=ExamplesResponse)
    return await answer(engine, timer, ExamplesResponse, run(), answer_page)
