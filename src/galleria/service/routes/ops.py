"""Operations: ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/info`` and ``/v1/upgrade``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from galleria.service.context import Ctx
from galleria.service.errors import bad_request
from galleria.service.requests import parse_bool, parse_int, parse_json_body
from galleria.service.schemas import ERRORS, UPGRADE_BODY, ErrorBody

router = APIRouter()


@router.get("/healthz", tags=["ops"], summary="liveness (the event loop answers)")
async def healthz() -> dict[str, Any]:
    return {"ok": True}


@router.get("/readyz", tags=["ops"], summary="readiness (models loaded, views built)",
            responses={503: {"model": ErrorBody}})
async def readyz(ctx: Ctx) -> Any:
    ctx.need_ready()
    return {"ready": True, "models": ctx.engine.models.fingerprints()}


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
            summary="Prometheus metrics (galleria_ prefix)")
async def metrics_text(request: Request,
                       ctx: Ctx) -> PlainTextResponse:
    ctx.guard(request, write=False)
    await asyncio.to_thread(ctx.engine.update_gauges)
    return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/info", tags=["gallery"],
            summary="spaces, counts, the searcher that answers by default, upgrade, limits")
async def info(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    return await ctx.reads.run(ctx.engine.info)


@router.get("/v1/upgrade", tags=["upgrade"], responses=ERRORS,
            summary="upgrade progress: fraction, rate, ETA, this server's run")
async def upgrade_status(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    return await ctx.reads.run(ctx.upgrades.status)


@router.post("/v1/upgrade", tags=["upgrade"], responses=ERRORS, openapi_extra=UPGRADE_BODY,
             summary="start / run (background) / cancel / finish an upgrade")
async def upgrade_action(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=True)
    body = parse_json_body(await request.body())
    action = body.get("action")
    up, writes = ctx.upgrades, ctx.writes
    if action == "start":
        model = body.get("new_model")
        if not isinstance(model, str) or not model:
            raise bad_request("start needs 'new_model' (see `galleria models`)", "bad_option")
        opts = {k: body[k] for k in ("mode", "order", "seed", "calib_size") if k in body}
        mopts = body.get("model_options") or {}
        if not isinstance(mopts, dict):
            raise bad_request("model_options must be an object (e.g. {\"size\": 260})",
                              "bad_option")
        return await writes.run(up.start, model, model_options=mopts, **opts)
    if action == "run":
        lim = body.get("limit")
        return await writes.run(  # may load the new model: not on the event loop
            up.run,
            limit=None if lim is None else parse_int(lim, "limit", 1, 10**9, 1),
            batch_size=parse_int(body.get("batch_size"), "batch_size", 1, 256, 16),
            commit_every=parse_int(body.get("commit_every"), "commit_every", 1, 4096, 64),
            retry_failed=parse_bool(body.get("retry_failed"), "retry_failed"))
    if action == "cancel":
        return await writes.run(up.cancel)
    if action == "finish":
        return await writes.run(up.finish, force=parse_bool(body.get("force"), "force"))
    raise bad_request("action must be one of start, run, cancel, finish", "bad_option")
