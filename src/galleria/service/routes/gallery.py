"""Per-gallery routes: ``/info``, ``/upgrade``, ``/dedup`` (relative to the gallery's
prefix), and ``GET /v1/galleries`` (the galleries a server serves)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from galleria.dedup import DedupConfig, find_duplicates
from galleria.errors import GalleriaError
from galleria.service.context import Ctx, all_contexts
from galleria.service.errors import ServiceError, bad_request, from_galleria
from galleria.service.requests import (
    DEDUP_KEYS,
    UPGRADE_KEYS,
    check_fields,
    parse_bool,
    parse_int,
    parse_json_body,
)
from galleria.service.schemas import DEDUP_BODY, ERRORS, UPGRADE_BODY

router = APIRouter()
top = APIRouter()


@top.get("/v1/galleries", tags=["gallery"], summary="the galleries this server serves")
async def galleries(request: Request) -> Any:
    out = []
    for name, c in all_contexts(request).items():
        c.guard(request, write=False)
        st = await c.reads.run(c.engine.gallery.state)
        out.append({"name": name, "path": f"/v1/galleries/{name}",
                    "items": max((sp.count for sp in st.spaces), default=0),
                    "ready": c.engine.ready.is_set(),
                    "auth": {"writes": c.config.token is not None,
                             "reads": bool(c.config.token and c.config.token_reads)}})
    return {"galleries": out}


@router.get("/info", tags=["gallery"],
            summary="spaces, counts, the searcher that answers by default, upgrade, limits")
async def info(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    return await ctx.reads.run(ctx.engine.info)


@router.get("/upgrade", tags=["upgrade"], responses=ERRORS,
            summary="upgrade progress: fraction, rate, ETA, this server's run")
async def upgrade_status(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    return await ctx.reads.run(ctx.upgrades.status)


@router.post("/upgrade", tags=["upgrade"], responses=ERRORS, openapi_extra=UPGRADE_BODY,
             summary="start / run (background) / cancel / finish an upgrade")
async def upgrade_action(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=True)
    body = parse_json_body(await request.body())
    check_fields(body.keys(), UPGRADE_KEYS, "upgrade request")
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


@router.post("/dedup", tags=["gallery"], responses=ERRORS, openapi_extra=DEDUP_BODY,
             summary="near-duplicate groups (global candidates, local verification)")
async def dedup(request: Request, ctx: Ctx) -> Any:
    ctx.guard(request, write=False)
    raw = await request.body()
    body = parse_json_body(raw) if raw.strip() else {}
    check_fields(body.keys(), DEDUP_KEYS, "dedup request")
    try:
        cfg = DedupConfig(**body)
    except (GalleriaError, TypeError) as exc:
        raise bad_request(str(exc), "bad_option") from exc

    def run() -> dict[str, Any]:
        try:
            return find_duplicates(ctx.engine.gallery, cfg).to_dict()
        except GalleriaError as exc:
            raise from_galleria(exc) from exc

    out = await ctx.reads.run(run)
    out.pop("gallery", None)  # the server's file path
    return out


__all__ = ["ServiceError", "router", "top"]
