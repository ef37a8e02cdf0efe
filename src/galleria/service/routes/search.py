"""``POST /v1/search`` and ``POST /v1/search/batch``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from galleria.service.context import Ctx
from galleria.service.engine import QuerySpec
from galleria.service.errors import ServiceError, bad_request, error_response
from galleria.service.requests import (
    BATCH_KEYS,
    QUERY_OBJECT_KEYS,
    check_fields,
    query_from_json,
    search_options,
)
from galleria.service.schemas import BATCH_BODY, ERRORS, SEARCH_BODY, SearchResponse

router = APIRouter(tags=["search"])


@router.post("/search", response_model=None, openapi_extra=SEARCH_BODY,
             responses={200: {"model": SearchResponse}, **ERRORS},
             summary="search with one image, embedding or item id")
async def search(request: Request, ctx: Ctx) -> Response:
    ctx.guard(request, write=False)
    ctx.need_ready()
    spec, opts = await ctx.one_query(request)
    out = await ctx.reads.run(ctx.engine.search, [spec], **opts)
    err = out[0].get("error")
    return error_response(err) if isinstance(err, ServiceError) else JSONResponse(out[0])


@router.post("/search/batch", response_model=None, openapi_extra=BATCH_BODY,
             responses=ERRORS,
             summary="search with many queries (one search; per-query errors inline)")
async def search_batch(request: Request, ctx: Ctx) -> Response:
    ctx.guard(request, write=False)
    ctx.need_ready()
    cfg = ctx.config
    kind, body = await ctx.body(request)
    params = dict(request.query_params)
    check_fields(params, BATCH_KEYS, "query string")
    check_fields(body.keys(), BATCH_KEYS, "batch request")
    specs: list[QuerySpec | ServiceError] = []
    if kind == "multipart":
        src = {**params, **{k: v for k, v in body.items() if isinstance(v, str)}}
        opts = search_options(src, cfg)
        for up in body.getlist("images") + body.getlist("image"):
            data, fname = await ctx.file_bytes(up, "images")
            specs.append(QuerySpec(image=data, name=fname))
    else:
        opts = search_options({**params, **body}, cfg)
        qs = body.get("queries")
        if not isinstance(qs, list):
            raise bad_request("send {\"queries\": [query objects]}", "bad_query")
        for q in qs[: cfg.max_batch + 1]:
            try:
                if isinstance(q, dict):
                    check_fields(q.keys(), QUERY_OBJECT_KEYS, "query")
                specs.append(query_from_json(q, cfg))
            except ServiceError as exc:
                specs.append(exc)
    if not specs:
        raise bad_request("the batch holds no queries", "bad_query")
    if len(specs) > cfg.max_batch:
        raise bad_request(f"at most {cfg.max_batch} queries per batch", "too_many")
    good = [s for s in specs if isinstance(s, QuerySpec)]
    answers = iter(await ctx.reads.run(ctx.engine.search, good, **opts) if good else [])
    out = []
    for s in specs:
        r = next(answers) if isinstance(s, QuerySpec) else {"error": s}
        err = r.get("error")
        out.append({"error": err.body()} if isinstance(err, ServiceError) else r)
    return JSONResponse({"responses": out})
