"""``/v1/items``: add (upload + id + metadata), get, thumbnail, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from galleria.service import items as item_ops
from galleria.service.context import Ctx
from galleria.service.requests import decode_base64, parse_bool
from galleria.service.schemas import ERRORS, ITEM_BODY

router = APIRouter(tags=["items"])


@router.post("/v1/items", response_model=None, openapi_extra=ITEM_BODY, responses=ERRORS,
             status_code=201,
             summary="add an item: upload + id + metadata (embedded and committed)")
async def add_item(request: Request, ctx: Ctx) -> Response:
    ctx.guard(request, write=True)
    ctx.need_ready()
    kind, body = await ctx.body(request)
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


@router.get("/v1/items/{item_id:path}/thumbnail", responses=ERRORS, response_class=Response,
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


@router.get("/v1/items/{item_id:path}", responses=ERRORS,
            summary="an item's metadata and the spaces holding its data")
async def get_item(request: Request, item_id: str,
                   ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    return await ctx.reads.run(item_ops.get_item, ctx.engine, item_id)


@router.delete("/v1/items/{item_id:path}", responses=ERRORS,
               summary="remove an item (all its data)")
async def delete_item(request: Request, item_id: str,
                      ctx: Ctx) -> Any:
    ctx.guard(request, write=True)
    return await ctx.writes.run(item_ops.remove_item, ctx.engine, item_id)
