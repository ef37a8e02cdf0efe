"""The HTTP API and web UI of ``galleria serve`` (FastAPI; docs at ``/docs``).

Routes (see docs/service.md)::

    POST   /v1/search               one query: multipart 'image', or JSON image_base64 /
                                    embedding + model / embeddings / id; k, offset, pipeline
    POST   /v1/search/batch         many queries, one search (per-query errors inline)
    POST   /v1/items                upload + id + metadata            (token when configured)
    GET    /v1/items/{id}           metadata, spaces
    DELETE /v1/items/{id}                                              (token when configured)
    GET    /v1/items/{id}/thumbnail JPEG, cached
    GET    /v1/info                 spaces, counts, the default searcher, upgrade, limits
    GET    /v1/upgrade              fraction, rate, ETA, this server's run
    POST   /v1/upgrade              {"action": start | run | cancel | finish}  (token)
    GET    /healthz  /readyz  /metrics  /  (the UI)

:func:`create_app` is the composition root: it builds the parts of the served
gallery (:class:`~galleria.service.context.ServiceContext`: engine, auth, worker
pools, upgrade runner, thumbnail cache), registers the error handlers and
includes the routers of :mod:`galleria.service.routes`, each handler receiving
the context by dependency injection. Handlers parse and validate on the event
loop (cheap) and run everything else (decoding, inference, search, commits) in
the bounded pools of :mod:`galleria.service.limits`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from galleria import __version__
from galleria.errors import GalleriaError
from galleria.service.auth import Auth
from galleria.service.context import ServiceContext
from galleria.service.engine import Engine, ServiceConfig
from galleria.service.errors import ServiceError, bad_request, error_response, from_galleria
from galleria.service.guard import Guard
from galleria.service.items import ThumbnailCache
from galleria.service.limits import BodyLimit, WorkerPool
from galleria.service.metrics import Metrics
from galleria.service.routes import items, ops, search
from galleria.service.upgrades import UpgradeRunner

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


# ------------------------------------------------------------- middleware
class MetricsMiddleware:
    """Counts and times every request by route template (ASGI, no body buffering)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            if endpoint.startswith("/static"):
                endpoint = "/static"
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status["code"],
                                         time.perf_counter() - t)


# ------------------------------------------------------------------- app
def build_context(config: ServiceConfig) -> ServiceContext:
    """The parts serving ``config.gallery`` (the gallery is opened now; models warm up
    in a thread when the app starts)."""
    metrics = Metrics()
    engine = Engine(config, metrics)
    ctx = ServiceContext(
        config=config, engine=engine, metrics=metrics,
        auth=Auth(config.token, protect_reads=config.token_reads),
        reads=WorkerPool(config.workers, config.queue, name="galleria-read"),
        writes=WorkerPool(1, config.write_queue, name="galleria-write"),
        upgrades=UpgradeRunner(engine),
        thumbs=ThumbnailCache(config.thumbnail_cache_bytes))
    metrics.add_collector(lambda m: _pool_gauges(m, ctx))
    return ctx


def _pool_gauges(m: Metrics, ctx: ServiceContext) -> None:
    for name, p in (("read", ctx.reads), ("write", ctx.writes)):
        lab = (("pool", name),)
        m.set_gauge("galleria_pool_running", p.running, "Tasks running in a pool.", lab)
        m.set_gauge("galleria_pool_queued", p.queued, "Tasks waiting for a pool thread.", lab)
        m.set_gauge("galleria_pool_rejected_total", p.rejected,
                    "Requests refused with 503 because the pool's queue was full.", lab)
        m.set_gauge("galleria_pool_capacity", p.capacity, "Running + queued limit.", lab)
    m.set_gauge("galleria_thumbnail_cache_bytes", ctx.thumbs.nbytes,
                "Bytes of cached thumbnails.")
    m.set_gauge("galleria_ready", 1 if ctx.engine.ready.is_set() else 0, "1 once serving.")
    m.set_gauge("galleria_view_refreshes_total", ctx.engine.refreshes,
                "Background view refreshes done.")


def add_error_handlers(app: FastAPI) -> None:
    """Every error a JSON ``{error, message, status}`` body."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(GalleriaError)
    async def _galleria_error(request: Request, exc: GalleriaError) -> JSONResponse:
        return error_response(from_galleria(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                         for e in exc.errors()[:5])
        return error_response(bad_request(f"invalid request: {msgs}", "bad_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        msg = str(exc.detail) if exc.status_code != 404 else \
            f"no such endpoint {request.url.path}; see /docs"
        return error_response(ServiceError(exc.status_code, code, msg))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(ServiceError(500, "internal", f"internal error "
                                           f"({type(exc).__name__}); the server keeps serving; "
                                           "see its log"))


def create_app(config: ServiceConfig) -> FastAPI:
    """The ASGI app serving ``config.gallery`` (see the module docstring)."""
    ctx = build_context(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.engine.start()
        try:
            yield
        finally:
            ctx.upgrades.stop()
            ctx.reads.shutdown()
            ctx.writes.shutdown()
            ctx.engine.stop()

    app = FastAPI(title="galleria", version=str(__version__), lifespan=lifespan,
                  description="Image search over one galleria gallery, while it grows and "
                              "upgrades. Errors are JSON `{error, message, status}`.")
    app.state.ctx = ctx
    app.state.engine = ctx.engine  # tests and tools reach the engine through the app
    app.state.upgrades = ctx.upgrades
    app.state.pools = (ctx.reads, ctx.writes)
    add_error_handlers(app)
    for r in (ops.router, search.router, items.router):
        app.include_router(r)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, gallery=config.gallery)  # JSON 500s on kept connections
    app.add_middleware(BodyLimit, upload_limit=config.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)  # outermost: counts 413s too
    return app
