"""``POST /explain`` (uploads or ids) and ``GET /explain`` (ids): JSON or a PNG picture."""

from __future__ import annotations

import io
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image

from model import Embedding, ImageGeometry, render_explanation
from service.budget import check_explanation
from service.deps import DIGITS, MAX_ID, EngineDep, Read, single_parts, within_deadline
from service.engine import Engine
from service.errors import ApiError
from service.limits import in_thread
from service.routes.search import ERRORS
from service.schemas import ExplanationOut

router = APIRouter(tags=["explain"], dependencies=[Read])

Format = Annotated[Literal["json", "png"], Query(description="json, or png for the picture")]
Top = Annotated[int, Query(ge=0, le=256, description="strongest part matches to list"), DIGITS]
# An image's embedding, geometry, picture (to draw) and, for a gallery item, its global basis
# (an upload's embedding keeps its map, which gives its own).
Side = tuple[Embedding, ImageGeometry, Image.Image | None, torch.Tensor | None]


async def _side(
    engine: Engine, name: str, upload: UploadFile | None, item_id: int | None, picture: bool
) -> Side:
    if (upload is None) == (item_id is None):
        raise ApiError(422, "invalid_request", f"give exactly one of '{name}' (an image) or "
                       f"'{name}_id' (a gallery id)")  # fmt: skip
    if upload is not None:
        query = await in_thread(engine.decode, await upload.read(), upload.filename or name)
        return (await engine.embed([query])), query.geometry, query.picture, None
    assert item_id is not None
    embedding, geometry, item, basis = await engine.stored_query(item_id)
    image = await in_thread(engine.stored_picture, item) if picture else None
    return embedding, geometry, image, basis


async def _explain(
    engine: Engine,
    a: tuple[UploadFile | None, int | None],
    b: tuple[UploadFile | None, int | None],
    top: int,
    format: str,
) -> Any:
    """Both sides (each an upload or a gallery id), then the explanation, within the deadline;
    a JSON one is first held to the response budget."""
    if format == "json":
        check_explanation(engine.config.grid, top)
    return await within_deadline(engine, _explain_sides(engine, a, b, top, format))


async def _explain_sides(
    engine: Engine,
    a_given: tuple[UploadFile | None, int | None],
    b_given: tuple[UploadFile | None, int | None],
    top: int,
    format: str,
) -> Any:
    a = await _side(engine, "a", *a_given, format == "png")
    b = await _side(engine, "b", *b_given, format == "png")
    explanation = await in_thread(engine.explain_pair, a[0], a[1], b[0], b[1], top, (a[3], b[3]))
    if format == "png":
        assert a[2] is not None
        assert b[2] is not None
        heights = (a[1].height, b[1].height)
        picture = await in_thread(render_explanation, a[2], b[2], explanation, top, heights)
        return Response(await in_thread(_png, picture), media_type="image/png")
    return await in_thread(lambda: JSONResponse(explanation.to_dict(matrices=True)))


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the explanation, or its picture"}
}


@router.post(
    "/explain",
    response_model=ExplanationOut,
    responses={**ERRORS, **PNG},
    dependencies=[single_parts("a", "b", "a_id", "b_id")],
)
async def explain_post(
    engine: EngineDep,
    a: Annotated[UploadFile | None, File(description="query image")] = None,
    a_id: Annotated[
        int | None, Form(ge=0, le=MAX_ID, description="or a gallery id as the query"), DIGITS
    ] = None,
    b: Annotated[UploadFile | None, File(description="image to compare")] = None,
    b_id: Annotated[
        int | None, Form(ge=0, le=MAX_ID, description="or a gallery id to compare"), DIGITS
    ] = None,
    format: Format = "json",
    top: Top = 5,
) -> Any:
    """How b matches a: the whole score split over both images' regions (global and
    structural terms and their total), the strongest part matches, and the full R x R flow."""
    return await _explain(engine, (a, a_id), (b, b_id), top, format)


@router.get("/explain", response_model=ExplanationOut, responses={**ERRORS, **PNG})
async def explain_get(
    engine: EngineDep,
    a_id: Annotated[int, Query(ge=0, le=MAX_ID, description="gallery id of the query"), DIGITS],
    b_id: Annotated[int, Query(ge=0, le=MAX_ID, description="gallery id to compare"), DIGITS],
    format: Format = "json",
    top: Top = 5,
) -> Any:
    """The same for two gallery items, by id (a link can show the picture)."""
    return await _explain(engine, (None, a_id), (None, b_id), top, format)
