"""Operations of the server: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from galleria.service.context import Ctx, all_contexts
from galleria.service.schemas import ErrorBody

router = APIRouter()


@router.get("/healthz", tags=["ops"], summary="liveness (the event loop answers)")
async def healthz() -> dict[str, Any]:
    return {"ok": True}


@router.get("/readyz", tags=["ops"], summary="readiness (models loaded, views built)",
            responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> Any:
    ctxs = all_contexts(request)
    for c in ctxs.values():
        c.need_ready()
    return {"ready": True, "models": sorted({m for c in ctxs.values()
                                             for m in c.engine.models.fingerprints()})}


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
            summary="Prometheus metrics (galleria_ prefix); with several galleries, the "
                    "requests and pools (per gallery: /v1/galleries/{name}/metrics)")
async def metrics_text(request: Request) -> PlainTextResponse:
    st = request.app.state
    ctxs = all_contexts(request)
    for c in ctxs.values():
        c.guard(request, write=False)
    if st.ctx is not None:
        await asyncio.to_thread(st.ctx.engine.update_gauges)
    return PlainTextResponse(st.server_metrics.render(), media_type="text/plain; version=0.0.4")


async def gallery_metrics(request: Request, ctx: Ctx) -> PlainTextResponse:
    """One gallery's gauges (items, spaces, upgrade)."""
    ctx.guard(request, write=False)
    await asyncio.to_thread(ctx.engine.update_gauges)
    return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")
