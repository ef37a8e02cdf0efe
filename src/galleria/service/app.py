"""The HTTP API and web UI of ``galleria serve`` (FastAPI; docs at ``/docs``).

Routes (see docs/service.md)::

    POST   /v1/search               one query: multipart 'image', or JSON image_base64 /
                                    embedding + model / embeddings / id; k, offset,
                                    pipeline, filter / where, min_score
    POST   /v1/search/batch         many queries, one search (per-query errors inline)
    POST   /v1/items                upload + id + metadata            (token when configured)
    GET    /v1/items                list a page (where, limit, cursor, count)
    POST   /v1/items/scroll         the same with a JSON filter; POST /v1/items/count
    GET    /v1/items/{id}           metadata, spaces
    DELETE /v1/items/{id}                                              (token when configured)
    GET    /v1/items/{id}/thumbnail JPEG, cached; /v1/items/{id}/image: full size
    GET    /v1/info                 spaces, counts, filterable fields, upgrade, limits
    GET    /v1/upgrade              fraction, rate, ETA, this server's run
    POST   /v1/upgrade              {"action": start | run | cancel | finish}  (token)
    POST   /v1/dedup                near-duplicate groups
    GET    /v1/galleries            the galleries served; each at /v1/galleries/{name}/...
    GET    /healthz  /readyz  /metrics  /docs  /  (the UI)

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

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from galleria import __version__
from galleria.errors import GalleriaError, InputError
from galleria.service.auth import Auth
from galleria.service.context import ServiceContext, gallery_name
from galleria.service.engine import Engine, ServiceConfig
from galleria.service.errors import ServiceError, bad_request, error_response, from_galleria
from galleria.service.guard import Guard
from galleria.service.items import ThumbnailCache
from galleria.service.limits import BodyLimit, WorkerPool
from galleria.service.metrics import Metrics
from galleria.service.routes import gallery, items, ops, search
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
            # a router included with a prefix keeps its own relative paths: add the prefix
            inc = (scope.get("fastapi") or {}).get("included_router")
            prefix = getattr(getattr(inc, "include_context", None), "prefix", "") or ""
            if route is not None and prefix:
                endpoint = prefix + endpoint
            if endpoint.startswith("/static"):
                endpoint = "/static"
            self.metrics.observe_request(endpoint, scope.get("method", "?"), status["code"],
                                         time.perf_counter() - t)


# ------------------------------------------------------------------- app
def build_context(config: ServiceConfig, *, reads: WorkerPool | None = None,
                  writes: WorkerPool | None = None) -> ServiceContext:
    """The parts serving ``config.gallery`` (the gallery is opened now; models warm up
    in a thread when the app starts); ``reads`` / ``writes``: pools shared with other
    galleries of the same server."""
    metrics = Metrics()
    engine = Engine(config, metrics)
    ctx = ServiceContext(
        config=config, engine=engine, metrics=metrics,
        auth=Auth(config.token, protect_reads=config.token_reads),
        reads=reads or WorkerPool(config.workers, config.queue, name="galleria-read"),
        writes=writes or WorkerPool(1, config.write_queue, name="galleria-write"),
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
    """The ASGI app serving ``config.gallery`` at ``/v1/...`` (see the module docstring)."""
    return create_multi_app({config.gallery.name: config}, single=True)


def create_multi_app(configs: dict[str, ServiceConfig], *, single: bool = False) -> FastAPI:
    """The ASGI app serving several galleries, each at ``/v1/galleries/{name}/...`` with
    its own token (``configs``: name -> config). With one gallery its routes are also at
    ``/v1/...`` (``single``: only there). The worker pools are shared: the server's
    concurrency is bounded whatever the number of galleries."""
    if not configs:
        raise InputError("no gallery to serve")
    first = next(iter(configs.values()))
    reads = WorkerPool(first.workers, first.queue, name="galleria-read")
    writes = WorkerPool(1, first.write_queue, name="galleria-write")
    contexts = {name: build_context(cfg, reads=reads, writes=writes)
                for name, cfg in configs.items()}
    server_metrics = next(iter(contexts.values())).metrics if len(contexts) == 1 else Metrics()
    if len(contexts) > 1:
        server_metrics.add_collector(lambda m: _pool_gauges(m, next(iter(contexts.values()))))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for c in contexts.values():
            c.engine.start()
        try:
            yield
        finally:
            for c in contexts.values():
                c.upgrades.stop()
            reads.shutdown()
            writes.shutdown()
            for c in contexts.values():
                c.engine.stop()

    what = "one galleria gallery" if single else "galleria galleries (/v1/galleries)"
    app = FastAPI(title="galleria", version=str(__version__), lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description=f"Image search over {what}, while they grow and upgrade. "
                              "Errors are JSON `{error, message, status}`.")
    only = next(iter(contexts.values())) if len(contexts) == 1 else None
    app.state.contexts = contexts
    app.state.ctx = only
    if only is not None:  # tests and tools reach the engine through the app
        app.state.engine = only.engine
        app.state.upgrades = only.upgrades
    app.state.pools = (reads, writes)
    app.state.server_metrics = server_metrics
    add_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(gallery.top)
    per_gallery = (search.router, items.router, gallery.router)
    for r in per_gallery:  # with several galleries these answer 404 naming them
        app.include_router(r, prefix="/v1")
    if not single:
        for r in per_gallery:
            app.include_router(r, prefix="/v1/galleries/{gallery}",
                               dependencies=[Depends(gallery_name)])
        app.add_api_route("/v1/galleries/{gallery}/metrics", ops.gallery_metrics,
                          methods=["GET"], tags=["ops"], response_class=PlainTextResponse,
                          summary="one gallery's metrics", dependencies=[Depends(gallery_name)])

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_docs(app)
    app.add_middleware(Guard, galleries=[c.gallery for c in configs.values()])  # JSON 500s
    app.add_middleware(BodyLimit, upload_limit=max(c.max_upload_bytes for c in configs.values()))
    app.add_middleware(MetricsMiddleware, metrics=server_metrics)  # outermost: counts 413s
    return app


def add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from local files (the fastapi-offline package's copy), so the
    page works without internet; without that package, FastAPI's CDN page."""
    from fastapi.openapi.docs import get_swagger_ui_html  # lazy: fastapi
    from fastapi.responses import HTMLResponse  # lazy: fastapi

    try:
        import fastapi_offline  # optional (galleria[service]): Swagger UI 5 files
    except ImportError:
        log.warning("fastapi-offline is not installed: /docs loads Swagger UI from a CDN")
        assets = None
    else:
        assets = Path(fastapi_offline.__file__).parent / "static"
        app.mount("/docs-static", StaticFiles(directory=assets), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="galleria API")
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="galleria API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon.png")
