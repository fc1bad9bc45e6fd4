"""``/gallery``: browse, fetch images by id, add and delete items."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse
from PIL import Image

from index_builder import Item
from index_builder.limits import MAX_KEY_LENGTH, MAX_LABEL_LENGTH
from service.deps import DIGITS, MAX_ID, EngineDep, ItemId, Read, Write, single_parts
from service.errors import ApiError
from service.limits import in_thread
from service.routes.search import ERRORS
from service.routing import ITEM_ID
from service.schemas import AddResponse, DeleteResponse, GalleryItemOut, GalleryPage, LabelCount

router = APIRouter(prefix="/gallery", tags=["gallery"], responses=ERRORS)
MEDIA = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
         "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}  # fmt: skip


def item_json(item: Item) -> dict[str, Any]:
    return {
        "id": item.id,
        "key": item.key,
        "label": item.label,
        "sha256": item.sha256,
        "width": item.width,
        "height": item.height,
        "added": item.added,
        "image_url": f"/gallery/{item.id}/image",
    }


@router.get("", response_model=GalleryPage, dependencies=[Read])
def list_items(
    engine: EngineDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID), DIGITS] = 0,
    limit: Annotated[int, Query(ge=1, le=500), DIGITS] = 50,
) -> dict[str, Any]:
    """A page of gallery items in id order."""
    items, total = engine.page(offset, limit)
    return {
        "items": [item_json(i) for i in items],
        "total": total,
        "offset": offset,
        "limit": limit,
    }


@router.get("/labels", response_model=list[LabelCount], dependencies=[Read])
def list_labels(engine: EngineDep) -> list[dict[str, Any]]:
    """Every label in the gallery with its number of items, most common first (what the
    ``label`` and ``exclude_label`` search filters take)."""
    return [{"label": label, "count": n} for label, n in engine.labels()]


@router.get(f"/{ITEM_ID}", response_model=GalleryItemOut, dependencies=[Read])
def get_item(item_id: ItemId, engine: EngineDep) -> dict[str, Any]:
    return item_json(engine.item(item_id))


@router.get(
    f"/{ITEM_ID}/image",
    dependencies=[Read],
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}, "description": "the original image file"}},
)
def get_image(item_id: ItemId, engine: EngineDep) -> FileResponse:
    """The item's original file, found by id only (never by a client-given path)."""
    item = engine.item(item_id)
    try:
        with Image.open(item.path or "") as image:
            media = MEDIA.get(image.format or "", "application/octet-stream")
    except OSError as e:
        raise ApiError(
            404, "not_found", f"the image of item {item_id} is no longer available"
        ) from e
    return FileResponse(item.path or "", media_type=media)


Key = Annotated[
    str | None,
    Form(max_length=MAX_KEY_LENGTH, description="external key (with several images: KEY-0, "
         "KEY-1, ...; without: each file's name)"),
]  # fmt: skip
Label = Annotated[
    str | None,
    Form(max_length=MAX_LABEL_LENGTH, description="label for all (what the search filters "
         "label and exclude_label take)"),
]  # fmt: skip


@router.post(
    "",
    response_model=AddResponse,
    status_code=201,
    dependencies=[Write, single_parts("key", "label")],
)
async def add_items(
    engine: EngineDep,
    response: Response,
    images: Annotated[list[UploadFile], File(description="images to add")],
    key: Key = None,
    label: Label = None,
) -> dict[str, Any]:
    """Add images, all or nothing: one upload that is not a usable image refuses the request
    (its 413/415/422 names it) and nothing is added. Bytes already in the gallery, or repeated
    in the request, are skipped and listed with the reason. 201 when something was added, 200
    when every image was already there."""
    if not images:
        raise ApiError(422, "invalid_request", "send at least one image")
    names = [u.filename or f"image-{i}" for i, u in enumerate(images)]
    _check_keys(names, key)
    uploads = [(name, await u.read()) for name, u in zip(names, images, strict=True)]
    added, skipped, count = await engine.add(uploads, key, label)
    if not added:
        response.status_code = 200
    return {"added": [item_json(i) for i in added], "skipped": skipped, "count": count}


def _check_keys(names: list[str], key: str | None) -> None:
    """The keys the items will have (:meth:`service.engine.Engine.add`: ``key``, or
    ``key-0``, ``key-1``, ... for several images, else each file's name) fit the key limit."""
    if key and len(names) > 1 and len(longest := f"{key}-{len(names) - 1}") > MAX_KEY_LENGTH:
        room = MAX_KEY_LENGTH - (len(longest) - len(key))
        raise ApiError(422, "invalid_request", f"key: with {len(names)} images the keys are "
                       f"KEY-0 to {longest[len(key):]}, and a key may have at most "
                       f"{MAX_KEY_LENGTH} characters; send a key of at most {room}")  # fmt: skip
    if not key and (long := [n for n in names if len(n) > MAX_KEY_LENGTH]):
        raise ApiError(422, "invalid_request", f"images: the file name {long[0][:40]!r}... "
                       f"becomes the item's key, and a key may have at most {MAX_KEY_LENGTH} "
                       "characters; rename the file or send a key")  # fmt: skip


@router.delete(f"/{ITEM_ID}", response_model=DeleteResponse, dependencies=[Write])
async def delete_item(item_id: ItemId, engine: EngineDep) -> dict[str, Any]:
    count = await in_thread(engine.remove, item_id)
    return {"removed": 1, "count": count}
