"""Request and response models: what the OpenAPI page at /docs documents."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Verdict = Literal["close", "related", "unrelated"]


class PartMatchOut(BaseModel):
    query_region: int
    result_region: int
    flow: float
    similarity: float
    contribution: float


class SideLists(BaseModel):
    """One term's contributions per region of each image; regions in the order of
    query_regions and result_regions (row-major grid cells)."""

    query: list[float] | None = Field(description="per query region")
    result: list[float] | None = Field(description="per result region")


class Residuals(BaseModel):
    query: float = Field(description="score - sum(total.query)")
    result: float = Field(description="score - sum(total.result)")


class Contributions(BaseModel):
    """The whole ranking score, split over the regions of both images, per term."""

    global_: SideLists = Field(
        alias="global",
        description="the global cosine split over map positions, shared out among the grid "
        "cells; each list sums to global_similarity (null for a gallery image whose picture "
        "is gone: its side is then not split, see residual)",
    )
    structural: SideLists = Field(
        description="row and column sums of flow x similarity; each sums to structural_similarity"
    )
    total: SideLists = Field(
        description="global + structural_weight x structural per region; each sums to score"
    )
    residual: Residuals = Field(
        description="what each side's totals leave unexplained: float rounding (below 1e-5) "
        "when exact"
    )
    exact: bool = Field(description="both sides' global term is split")


class SinkhornOut(BaseModel):
    converged: bool
    marginal_error: float
    iterations: int


class ExplanationOut(BaseModel):
    """The same schema as ``diml explain --json``; search results leave out the matrices."""

    epsilon: float
    grid: int
    query_weights: list[float]
    result_weights: list[float]
    query_regions: list[list[float]] = Field(description="[x0, y0, x1, y1] in query pixels")
    result_regions: list[list[float]] = Field(description="[x0, y0, x1, y1] in result pixels")
    contributions: Contributions
    matches: list[PartMatchOut]
    global_similarity: float
    structural_similarity: float
    structural_weight: float = Field(
        description="the model's weight w of the structural term: score = global + w x structural"
    )
    score: float
    verdict: Verdict | None = Field(
        description="close, related or unrelated, by the score bands calibrated with the model "
        "(null: the model has none)"
    )
    ranked_by: str = Field(description="what orders the results, in words")
    sinkhorn: SinkhornOut
    plan: list[list[float]] | None = Field(None, description="R x R flow, rows = query parts")
    similarity: list[list[float]] | None = None


class Hit(BaseModel):
    id: int
    key: str
    label: str | None
    score: float = Field(
        description="global_similarity + w x structural_similarity for every hit, re-ranked or "
        "not (w: the response's structural_weight); both terms are cosine similarities in "
        "[-1, 1], so the score lies in [-(1 + w), 1 + w]"
    )
    global_similarity: float
    structural_similarity: float
    reranked: bool = Field(
        description="placed by its score among the top rerank_k; false: placed in global order"
    )
    global_rank: int = Field(description="1-based rank by the global vector alone")
    verdict: Verdict | None = Field(
        description="close, related or unrelated by the model's calibrated score bands"
    )
    image_url: str
    explanation: ExplanationOut | None = None


class GroupOut(BaseModel):
    label: str | None
    results: list[Hit]


class SearchResponse(BaseModel):
    results: list[Hit]
    offset: int = Field(description="where in the ranking this page starts")
    next_offset: int | None = Field(
        description="the offset of the next page of the same ranking; null at its end"
    )
    structural_weight: float = Field(description="w in score = global + w x structural")
    ranked_by: str = Field(description="what orders the results, in words")
    nothing_close: bool | None = Field(
        description="true when no result of this page is close (null: the model has no "
        "calibrated score bands)"
    )
    groups: list[GroupOut] | None = Field(
        None, description="with group_by: the groups, best first (results: their hits in order)"
    )


class ExampleHit(Hit):
    positive: int = Field(
        description="the positive example this hit matches best and is explained against "
        "(its position among the positives: uploads first, then ids)"
    )


class ExamplesResponse(SearchResponse):
    results: list[ExampleHit]  # type: ignore[assignment]


class BatchSearchResponse(BaseModel):
    queries: list[SearchResponse]


class GalleryItemOut(BaseModel):
    id: int
    key: str
    label: str | None
    sha256: str
    width: int
    height: int
    added: str
    image_url: str


class GalleryPage(BaseModel):
    items: list[GalleryItemOut]
    total: int
    offset: int
    limit: int


class DuplicatePairOut(BaseModel):
    a: int = Field(description="an item id (the smaller)")
    b: int = Field(description="the other item id")
    global_similarity: float
    structural_similarity: float


class DuplicateGroupOut(BaseModel):
    items: list[GalleryItemOut] = Field(
        description="near-copies of each other, by id (the first 100 of a larger group)"
    )
    pairs: list[DuplicatePairOut] = Field(
        description="the confirmed pairs that join them, most alike first (at most 100)"
    )
    size: int = Field(description="items in the whole group")
    pair_count: int = Field(description="confirmed pairs in the whole group")


class DuplicatesPage(BaseModel):
    groups: list[DuplicateGroupOut]
    total: int = Field(description="groups in the whole gallery")
    offset: int
    limit: int
    threshold: float
    structural_threshold: float


class LabelCount(BaseModel):
    label: str
    count: int


class Skipped(BaseModel):
    filename: str
    reason: str


class AddResponse(BaseModel):
    added: list[GalleryItemOut]
    skipped: list[Skipped]
    count: int


class DeleteResponse(BaseModel):
    removed: int
    count: int


class Health(BaseModel):
    status: str
    items: int | None = None
    model: str | None = None
    device: str | None = None
    inference: str | None = Field(None, description="what runs the backbone: onnx or torch")
    coarse_search: str | None = Field(None, description="what searches the global vectors: "
                                      "faiss, or torch (exact, on the device)")  # fmt: skip
    grids: str | None = Field(None, description="where re-ranking reads the part grids: "
                              "index (host) or device")  # fmt: skip


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
