"""``/items``: add (upload + id + metadata), list / scroll / count with a filter, get,
thumbnail, full-size image, delete. Paths are relative to the gallery's prefix
(``/v1`` or ``/v1/galleries/{gallery}``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from galleria.service import items as item_ops
from galleria.service.context import Ctx
from galleria.service.errors import bad_request
from galleria.service.requests import (
    ITEM_KEYS,
    SCROLL_KEYS,
    check_fields,
    decode_base64,
    parse_bool,
    parse_filter_fields,
    parse_int,
    parse_json_body,
)
from galleria.service.schemas import ERRORS, ITEM_BODY, SCROLL_BODY, ItemPage

router = APIRouter(tags=["items"])
MAX_PAGE = 1000


@router.post("/items", response_model=None, openapi_extra=ITEM_BODY, responses=ERRORS,
             status_code=201,
             summary="add an item: upload + id + metadata (embedded and committed)")
async def add_item(request: Request, ctx: Ctx) -> Response:
    ctx.guard(request, write=True)
    ctx.need_ready()
    kind, body = await ctx.body(request)
    check_fields(body.keys(), ITEM_KEYS, "item")
    if kind == "multipart":
        data, fname = await ctx.file_bytes(body.get("image"), "image")
    else:
        data = decode_base64(body.get("image_base64"), ctx.config.max_upload_bytes)
        fname = str(body.get("filename") or "upload")
    item_id, raw_meta, replace = body.get("id"), body.get("metadata"), body.get("replace")
    item_id = item_ops.check_item_id(item_id)
    meta = item_ops.check_metadata(raw_meta, ctx.config.max_meta_bytes)
    rep = await ctx.writes.run(item_ops.add_item, ctx.engine, item_id, data, filename=fname,
                               metadata=meta, replace=parse_bool(replace, "replace"))
    return JSONResponse(rep, status_code=200 if rep["replaced"] else 201)


@router.get("/items", responses={200: {"model": ItemPage}, **ERRORS},
            summary="list items in insertion order, a page at a time, with a filter")
async def list_items(request: Request, ctx: Ctx,
                     where: list[str] = Query(default=[], description=(  # noqa: B008
                         "compact filter expressions, all must hold: label=cat, year>=2010, "
                         "tags=a,b (any of), label!=cat")),
                     limit: int = 50, cursor: str | None = None, count: bool = False,
                     space: str | None = None) -> Any:
    ctx.guard(request, write=False)
    check_fields(request.query_params.keys(), SCROLL_KEYS, "query string")
    f = parse_filter_fields({"where": where})
    return await ctx.reads.run(item_ops.list_page, ctx.engine, where=f, cursor=cursor,
                               limit=parse_int(limit, "limit", 1, MAX_PAGE, 50), count=count,
                               space=space)


@router.post("/items/scroll", responses={200: {"model": ItemPage}, **ERRORS},
             openapi_extra=SCROLL_BODY,
             summary="one page of the items matching a filter (JSON filter); next_cursor "
                     "continues")
async def scroll(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    body = parse_json_body(await request.body())
    check_fields(body.keys(), SCROLL_KEYS, "scroll request")
    cursor = body.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise bad_request("cursor must be the next_cursor text of the previous page",
                          "bad_option")
    space = body.get("space")
    return await ctx.reads.run(
        item_ops.list_page, ctx.engine, where=parse_filter_fields(body), cursor=cursor,
        limit=parse_int(body.get("limit"), "limit", 1, MAX_PAGE, 50),
        count=parse_bool(body.get("count"), "count"),
        space=space if isinstance(space, str) else None)


@router.post("/items/count", responses=ERRORS, openapi_extra=SCROLL_BODY,
             summary="how many items match a filter")
async def count(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    body = parse_json_body(await request.body() or b"{}")
    check_fields(body.keys(), SCROLL_KEYS - {"limit", "cursor", "count"}, "count request")
    space = body.get("space")
    return await ctx.reads.run(item_ops.count, ctx.engine, where=parse_filter_fields(body),
                               space=space if isinstance(space, str) else None)


@router.get("/items/{item_id:path}/thumbnail", responses=ERRORS, response_class=Response,
            summary="a JPEG thumbnail of an item's image")
async def item_thumbnail(request: Request, item_id: str, ctx: Ctx,
                         size: int = 256) -> Response:
    ctx.guard(request, write=False)
    data, etag = await ctx.reads.run(item_ops.thumbnail, ctx.engine, ctx.thumbs, item_id,
                                     int(size))
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(data, media_type="image/jpeg",
                    headers={"ETag": etag, "Cache-Control": "max-age=300"})


@router.get("/items/{item_id:path}/image", responses=ERRORS, response_class=Response,
            summary="an item's image at full size (JPEG)")
async def item_image(request: Request, item_id: str, ctx: Ctx) -> Response:
    ctx.guard(request, write=False)
    data, etag = await ctx.reads.run(item_ops.full_image, ctx.engine, item_id)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(data, media_type="image/jpeg",
                    headers={"ETag": etag, "Cache-Control": "max-age=300"})


@router.get("/items/{item_id:path}", responses=ERRORS,
            summary="an item's metadata and the spaces holding its data")
async def get_item(request: Request, item_id: str,
                   ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    return await ctx.reads.run(item_ops.get_item, ctx.engine, item_id)


@router.delete("/items/{item_id:path}", responses=ERRORS,
               summary="remove an item (all its data)")
async def delete_item(request: Request, item_id: str,
                      ctx: Ctx) -> Any:
    ctx.guard(request, write=True)
    return await ctx.writes.run(item_ops.remove_item, ctx.engine, item_id)
