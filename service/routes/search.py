"""``POST /search``, ``POST /search/by-id/{id}``, ``POST /search/batch``,
``POST /search/examples``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, File, Query, Response, UploadFile
from pydantic import Field, StringConstraints

from index_builder import LabelFilter
from index_builder.limits import MAX_LABEL_LENGTH
from model import Embedding, ImageGeometry, MatchingConfig, ModelInput
from model.explain import bases_of, ranking_rule, verdict_of
from model.matching import ranking_score
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
from service.limits import check_deadline, in_thread
from service.metrics import StageTimer
from service.routing import ITEM_ID
from service.schemas import BatchSearchResponse, ErrorBody, ExamplesResponse, SearchResponse
from service.search import Hit, Page, SearchOptions

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


def hit_json(hit: Hit, matching: MatchingConfig) -> dict[str, Any]:
    """A hit as the API answers it (``SearchHit``); its verdict is that of its score against
    the query (an example search's: against the positive it matches best). Past the request's
    deadline it raises instead: a long answer stops between two hits."""
    check_deadline()
    item = hit.item
    pair_score = ranking_score(
        hit.global_similarity, hit.structural_similarity, matching.structural_weight
    )
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
    """One query's page as the API answers it (``SearchResponse``)."""
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


async def _run(
    engine: Engine,
    uploads: list[UploadFile],
    timer: StageTimer,
    options: SearchOptions,
) -> list[Page]:
    queries = await _decode(engine, uploads, timer)
    grouped = options.group_size is not None
    with timer.stage("embed"):
        embedding = await engine.embed(queries, search_next=not grouped)
    geometries = [q.geometry for q in queries]
    return await _find(engine, embedding, geometries, options, timer, embedded=not grouped)


async def _decode(engine: Engine, uploads: list[UploadFile], timer: StageTimer) -> list[ModelInput]:
    """Each upload read and decoded (named by its file name in any error)."""
    with timer.stage("decode"):
        return [await in_thread(engine.decode, await u.read(), u.filename or "image")
                for u in uploads]  # fmt: skip


async def _find(
    engine: Engine,
    embedding: Embedding,
    geometries: list[ImageGeometry],
    options: SearchOptions,
    timer: StageTimer,
    embedded: bool = False,
    stored: list[torch.Tensor | None] | None = None,
) -> list[Page]:
    """Through the shared search batcher, or, for grouped searches, one query at a time; then
    the explanations' global term split over both images' regions (``stored``: the global
    bases of queries that are gallery items)."""
    if options.group_size is None:
        pages = await engine.find(embedding, geometries, options, timer, embedded=embedded)
    else:
        pages = [
            await in_thread(engine.search_grouped, embedding[i : i + 1], geometry, options, timer)
            for i, geometry in enumerate(geometries)
        ]
    return await _split(engine, pages, embedding, timer, stored)


async def _split(
    engine: Engine,
    pages: list[Page],
    queries: Embedding,
    timer: StageTimer,
    stored: list[torch.Tensor | None] | None = None,
) -> list[Page]:
    with timer.stage("explain_global"):
        return await engine.split_global(pages, queries, stored)


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

    def queries(pages: list[Page]) -> dict[str, Any]:
        return {"queries": [page_json(page, matching) for page in pages]}

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
            return await _find(engine, embedding, [geometry], options, timer)
        embedding, geometry, _, basis = await engine.stored_query(item_id)
        return await _find(engine, embedding, [geometry], options, timer, stored=[basis])

    return await answer(engine, timer, SearchResponse, run(), _first_page(engine))


def _first_page(engine: Engine) -> Callable[[list[Page]], dict[str, Any]]:
    """What builds the answer to one query (``SearchResponse``) from its list of pages."""
    matching = engine.config.matching
    return lambda pages: page_json(pages[0], matching)


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
        pos, pos_geometries, bases = await _examples(
            engine, positive, positive_ids, timer, options.explain
        )
        neg = (await _examples(engine, negative, negative_ids, timer, False))[0] if (
            negative or negative_ids) else None  # fmt: skip
        exclude = positive_ids + negative_ids
        page = await in_thread(
            engine.search_examples, pos, pos_geometries, neg, exclude, options, timer
        )
        return (await _split(engine, [page], pos, timer, bases))[0]

    matching = engine.config.matching
    return await answer(engine, timer, ExamplesResponse, run(), lambda p: page_json(p, matching))


async def _examples(
    engine: Engine, uploads: list[UploadFile], ids: list[int], timer: StageTimer, bases: bool
) -> tuple[Embedding, list[ImageGeometry], list[torch.Tensor | None]]:
    """Uploads (decoded and embedded together), then stored items, as one Embedding, and with
    ``bases`` every example's global basis (None where a stored item's picture is gone)."""
    parts: list[Embedding] = []
    geometries: list[ImageGeometry] = []
    stored: list[torch.Tensor | None] = []
    if uploads:
        decoded = await _decode(engine, uploads, timer)
        with timer.stage("embed"):
            embedded = await engine.embed(decoded)
        parts.append(embedded.without_maps())
        geometries += [d.geometry for d in decoded]
        made = bases_of(embedded, engine.config.grid) if bases else None
        stored += [None] * len(decoded) if made is None else list(made)
    for item_id in ids:
        if bases:
            embedding, geometry, _, basis = await engine.stored_query(item_id)
            stored.append(basis)
        else:
            embedding, geometry, _ = await in_thread(engine.stored, item_id)
        parts.append(embedding)
        geometries.append(geometry)
    return Embedding.cat(parts), geometries, stored
