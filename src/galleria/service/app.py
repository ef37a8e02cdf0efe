"""The HTTP API and web UI of ``galleria serve`` (FastAPI; docs at ``/docs``).

Routes (see docs/service.md)::

    POST   /v1/search               one query: multipart 'image', or JSON image_base64 /
                                    embedding + model / embeddings / id; k, offset, pipeline
    POST   /v1/search/batch         many queries, one search (per-query errors inline)
    POST   /v1/items                upload + id + metadata            (token when configured)
    GET    /v1/items/{id}           metadata, spaces
    DELETE /v1/items/{id}                                              (token when configured)
    GET    /v1/items/{id}/thumbnail JPEG, cached
    GET    /v1/info                 spaces, counts, upgrade, limits
    GET    /v1/upgrade              fraction, rate, ETA, this server's run
    POST   /v1/upgrade              {"action": start | run | cancel | finish}  (token)
    GET    /healthz  /readyz  /metrics  /  (the UI)

Handlers parse and validate on the event loop (cheap) and run everything else
(decoding, inference, search, commits) in the bounded pools of
:mod:`galleria.service.limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from galleria.errors import GalleriaError
from galleria.service import items as item_ops
from galleria.service.auth import Auth
from galleria.service.engine import Engine, QuerySpec, ServiceConfig
from galleria.service.errors import ServiceError, bad_request, from_galleria
from galleria.service.limits import BodyLimit, WorkerPool
from galleria.service.metrics import Metrics
from galleria.service.requests import (
    decode_base64,
    parse_bool,
    parse_int,
    parse_json_body,
    query_from_json,
    search_options,
)
from galleria.service.upgrades import UpgradeRunner

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


# ------------------------------------------------------------- docs models
class Hit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    results: list[Hit]
    model: str = Field(description="fingerprint of the model whose space answered (the new "
                                   "model during an upgrade)")
    generation: int | dict[str, int] = Field(
        description="the committed store generation the answer was computed at (per space "
                    "during an upgrade)")
    k: int
    offset: int
    searcher: str = Field(description="plain | backfill | pipeline | sharded")
    pipeline: str = Field(description="the pipeline that answered (global, local, ...)")
    reason: str = Field(description="why it answered: asked, tuned, gallery spaces, upgrade "
                                    "in progress, ...")
    merge: dict[str, Any] | None = Field(None, description="during an upgrade: the merge rule "
                                               "and calibration that combined both spaces")


class SearchJSON(BaseModel):
    image_base64: str | None = Field(None, description="an encoded image (JPEG, PNG...)")
    embedding: list[float] | None = Field(None, description="a query vector of `model`")
    model: str | None = Field(None, description="fingerprint of the model of `embedding`")
    embeddings: dict[str, list[float]] | None = Field(
        None, description="query vectors per model fingerprint (an upgrade merges two)")
    id: str | None = Field(None, description="search with an item of the gallery")
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0)
    pipeline: str | None = Field(None, description="global, global+sv, local, local+mds; "
                                                   "default: the gallery's (as the CLI)")
    return_query: bool = False


class ErrorBody(BaseModel):
    error: str
    message: str
    status: int


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody} for s in (400, 401, 403, 404, 409, 413, 415, 422, 503)}


def _multipart_doc(fields: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    return {"multipart/form-data": {"schema": {"type": "object", "properties": fields,
                                               "required": required}}}


SEARCH_BODY = {"requestBody": {"content": {
    **_multipart_doc({"image": {"type": "string", "format": "binary"},
                      "id": {"type": "string"}, "k": {"type": "integer"},
                      "offset": {"type": "integer"}, "pipeline": {"type": "string"}}, []),
    "application/json": {"schema": SearchJSON.model_json_schema()}}}}
BATCH_BODY = {"requestBody": {"content": {
    **_multipart_doc({"images": {"type": "array", "items": {"type": "string",
                                                             "format": "binary"}},
                      "k": {"type": "integer"}}, ["images"]),
    "application/json": {"schema": {"type": "object", "properties": {
        "queries": {"type": "array", "items": SearchJSON.model_json_schema()},
        "k": {"type": "integer"}, "offset": {"type": "integer"}}}}}}}
ITEM_BODY = {"requestBody": {"content": {
    **_multipart_doc({"image": {"type": "string", "format": "binary"},
                      "id": {"type": "string"}, "metadata": {"type": "string",
                                                             "description": "a JSON object"},
                      "replace": {"type": "boolean"}}, ["image", "id"]),
    "application/json": {"schema": {"type": "object", "properties": {
        "id": {"type": "string"}, "image_base64": {"type": "string"},
        "metadata": {"type": "object"}, "replace": {"type": "boolean"}},
        "required": ["id", "image_base64"]}}}}}
UPGRADE_BODY = {"requestBody": {"content": {"application/json": {"schema": {
    "type": "object", "required": ["action"], "properties": {
        "action": {"enum": ["start", "run", "cancel", "finish"]},
        "new_model": {"type": "string"}, "mode": {"enum": ["online", "shadow"]},
        "model_options": {"type": "object", "description": "e.g. {\"size\": 260}"},
        "order": {"enum": ["random", "id", "priority"]}, "seed": {"type": "integer"},
        "limit": {"type": "integer"}, "batch_size": {"type": "integer"},
        "commit_every": {"type": "integer"}, "force": {"type": "boolean"}}}}}}}


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


def _error(err: ServiceError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ------------------------------------------------------------------- app
def create_app(config: ServiceConfig) -> FastAPI:
    """The ASGI app serving ``config.gallery`` (opened now; models warm up in a thread)."""
    metrics = Metrics()
    engine = Engine(config, metrics)
    auth = Auth(config.token, protect_reads=config.token_reads)
    reads = WorkerPool(config.workers, config.queue, name="galleria-read")
    writes = WorkerPool(1, config.write_queue, name="galleria-write")
    upgrades = UpgradeRunner(engine)
    thumbs = item_ops.ThumbnailCache(config.thumbnail_cache_bytes)

    def pool_gauges(m: Metrics) -> None:
        for name, p in (("read", reads), ("write", writes)):
            lab = (("pool", name),)
            m.set_gauge("galleria_pool_running", p.running, "Tasks running in a pool.", lab)
            m.set_gauge("galleria_pool_queued", p.queued, "Tasks waiting for a pool thread.",
                        lab)
            m.set_gauge("galleria_pool_rejected_total", p.rejected,
                        "Requests refused with 503 because the pool's queue was full.", lab)
            m.set_gauge("galleria_pool_capacity", p.capacity, "Running + queued limit.", lab)
        m.set_gauge("galleria_thumbnail_cache_bytes", thumbs.nbytes, "Bytes of cached thumbnails.")
        m.set_gauge("galleria_ready", 1 if engine.ready.is_set() else 0, "1 once serving.")
        m.set_gauge("galleria_view_refreshes_total", engine.refreshes,
                    "Background view refreshes done.")

    metrics.add_collector(pool_gauges)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            upgrades.stop()
            reads.shutdown()
            writes.shutdown()
            engine.stop()

    app = FastAPI(title="galleria", version=_version(), lifespan=lifespan,
                  description="Image search over one galleria gallery, while it grows and "
                              "upgrades. Errors are JSON `{error, message, status}`.")
    app.state.engine = engine
    app.state.upgrades = upgrades
    app.state.pools = (reads, writes)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(GalleriaError)
    async def _galleria_error(request: Request, exc: GalleriaError) -> JSONResponse:
        return _error(from_galleria(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                         for e in exc.errors()[:5])
        return _error(bad_request(f"invalid request: {msgs}", "bad_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        msg = str(exc.detail) if exc.status_code != 404 else \
            f"no such endpoint {request.url.path}; see /docs"
        return _error(ServiceError(exc.status_code, code, msg))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error(ServiceError(500, "internal", f"internal error ({type(exc).__name__}); "
                                   "the server keeps serving; see its log"))

    def guard(request: Request, *, write: bool) -> None:
        auth.check(request.headers.get("authorization"), write=write)

    def need_ready() -> None:
        if not engine.ready.is_set():
            why = f": {engine.startup_error}" if engine.startup_error else ""
            raise ServiceError(503, "starting", f"the server is starting (loading models){why}",
                               headers={"Retry-After": "2"})

    # ------------------------------------------------------------ health
    @app.get("/healthz", tags=["ops"], summary="liveness (the event loop answers)")
    async def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/readyz", tags=["ops"], summary="readiness (models loaded, views built)",
             responses={503: {"model": ErrorBody}})
    async def readyz() -> Any:
        need_ready()
        return {"ready": True, "models": engine.models.fingerprints()}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
             summary="Prometheus metrics (galleria_ prefix)")
    async def metrics_text(request: Request) -> PlainTextResponse:
        guard(request, write=False)
        await asyncio.to_thread(engine.update_gauges)
        text = metrics.render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------ search
    async def _body(request: Request) -> tuple[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=config.max_batch, max_fields=64)
            except ServiceError:
                raise
            except Exception as exc:
                raise bad_request(f"malformed multipart body: {exc}", "bad_multipart") from exc
            return "multipart", form
        if ctype in ("application/json", ""):
            return "json", parse_json_body(await request.body())
        raise ServiceError(415, "unsupported_media_type",
                           f"send multipart/form-data or application/json, not {ctype!r}")

    async def _file_bytes(upload: Any, name: str) -> tuple[bytes, str]:
        if isinstance(upload, str) or upload is None:
            raise bad_request(f"'{name}' must be an uploaded file", "bad_multipart")
        data = await upload.read()
        if len(data) > config.max_upload_bytes:
            raise ServiceError(413, "too_large", f"the image is larger than the limit of "
                               f"{config.max_upload_bytes} bytes")
        return data, upload.filename or name

    async def _one_query(request: Request) -> tuple[QuerySpec, dict[str, Any]]:
        kind, body = await _body(request)
        params = dict(request.query_params)
        if kind == "multipart":
            src = {**params, **{k: v for k, v in body.items() if isinstance(v, str)}}
            opts = search_options(src, config)
            if body.get("image") is not None:
                data, fname = await _file_bytes(body.get("image"), "image")
                if src.get("id"):
                    raise bad_request("give either an image or an id, not both", "bad_query")
                return QuerySpec(image=data, name=fname), opts
            if src.get("id"):
                return query_from_json({"id": src["id"]}, config), opts
            raise bad_request("upload the query image as multipart field 'image' (or give "
                              "'id')", "bad_query")
        opts = search_options({**params, **body}, config)
        return query_from_json(body, config), opts

    def _answer(resp: dict[str, Any]) -> JSONResponse:
        err = resp.get("error")
        if isinstance(err, ServiceError):
            return _error(err)
        return JSONResponse(resp)

    @app.post("/v1/search", tags=["search"], response_model=None, openapi_extra=SEARCH_BODY,
              responses={200: {"model": SearchResponse}, **ERRORS},
              summary="search with one image, embedding or item id")
    async def search(request: Request) -> Response:
        guard(request, write=False)
        need_ready()
        spec, opts = await _one_query(request)
        out = await reads.run(engine.search, [spec], **opts)
        return _answer(out[0])

    @app.post("/v1/search/batch", tags=["search"], response_model=None,
              openapi_extra=BATCH_BODY, responses=ERRORS,
              summary="search with many queries (one search; per-query errors inline)")
    async def search_batch(request: Request) -> Response:
        guard(request, write=False)
        need_ready()
        kind, body = await _body(request)
        params = dict(request.query_params)
        specs: list[QuerySpec | ServiceError] = []
        if kind == "multipart":
            src = {**params, **{k: v for k, v in body.items() if isinstance(v, str)}}
            opts = search_options(src, config)
            for up in body.getlist("images") + body.getlist("image"):
                data, fname = await _file_bytes(up, "images")
                specs.append(QuerySpec(image=data, name=fname))
        else:
            opts = search_options({**params, **body}, config)
            qs = body.get("queries")
            if not isinstance(qs, list):
                raise bad_request("send {\"queries\": [query objects]}", "bad_query")
            for q in qs[: config.max_batch + 1]:
                try:
                    specs.append(query_from_json(q, config))
                except ServiceError as exc:
                    specs.append(exc)
        if not specs:
            raise bad_request("the batch holds no queries", "bad_query")
        if len(specs) > config.max_batch:
            raise bad_request(f"at most {config.max_batch} queries per batch", "too_many")
        good = [s for s in specs if isinstance(s, QuerySpec)]
        answers = iter(await reads.run(engine.search, good, **opts) if good else [])
        out = []
        for s in specs:
            r = next(answers) if isinstance(s, QuerySpec) else {"error": s}
            err = r.get("error")
            out.append({"error": err.body()} if isinstance(err, ServiceError) else r)
        return JSONResponse({"responses": out})

    # ------------------------------------------------------------- items
    @app.post("/v1/items", tags=["items"], response_model=None, openapi_extra=ITEM_BODY,
              responses=ERRORS, status_code=201,
              summary="add an item: upload + id + metadata (embedded and committed)")
    async def add_item(request: Request) -> Response:
        guard(request, write=True)
        need_ready()
        kind, body = await _body(request)
        if kind == "multipart":
            data, fname = await _file_bytes(body.get("image"), "image")
            item_id, raw_meta, replace = body.get("id"), body.get("metadata"), body.get("replace")
        else:
            data = decode_base64(body.get("image_base64"), config.max_upload_bytes)
            fname = str(body.get("filename") or "upload")
            item_id, raw_meta, replace = body.get("id"), body.get("metadata"), body.get("replace")
        item_id = item_ops.check_item_id(item_id)
        meta = item_ops.check_metadata(raw_meta, config.max_meta_bytes)
        rep = await writes.run(item_ops.add_item, engine, item_id, data, filename=fname,
                               metadata=meta, replace=parse_bool(replace, "replace"))
        return JSONResponse(rep, status_code=200 if rep["replaced"] else 201)

    @app.get("/v1/items/{item_id:path}/thumbnail", tags=["items"], responses=ERRORS,
             response_class=Response, summary="a JPEG thumbnail of an item's image")
    async def item_thumbnail(request: Request, item_id: str, size: int = 256) -> Response:
        guard(request, write=False)
        data, etag = await reads.run(item_ops.thumbnail, engine, thumbs, item_id, int(size))
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(data, media_type="image/jpeg",
                        headers={"ETag": etag, "Cache-Control": "max-age=300"})

    @app.get("/v1/items/{item_id:path}", tags=["items"], responses=ERRORS,
             summary="an item's metadata and the spaces holding its data")
    async def get_item(request: Request, item_id: str) -> Any:
        guard(request, write=False)
        return await reads.run(item_ops.get_item, engine, item_id)

    @app.delete("/v1/items/{item_id:path}", tags=["items"], responses=ERRORS,
                summary="remove an item (all its data)")
    async def delete_item(request: Request, item_id: str) -> Any:
        guard(request, write=True)
        return await writes.run(item_ops.remove_item, engine, item_id)

    # -------------------------------------------------------------- info
    @app.get("/v1/info", tags=["gallery"], summary="spaces, counts, upgrade state, limits")
    async def info(request: Request) -> Any:
        guard(request, write=False)
        return await reads.run(engine.info)

    @app.get("/v1/upgrade", tags=["upgrade"], responses=ERRORS,
             summary="upgrade progress: fraction, rate, ETA, this server's run")
    async def upgrade_status(request: Request) -> Any:
        guard(request, write=False)
        return await reads.run(upgrades.status)

    @app.post("/v1/upgrade", tags=["upgrade"], responses=ERRORS, openapi_extra=UPGRADE_BODY,
              summary="start / run (background) / cancel / finish an upgrade")
    async def upgrade_action(request: Request) -> Any:
        guard(request, write=True)
        body = parse_json_body(await request.body())
        action = body.get("action")
        if action == "start":
            model = body.get("new_model")
            if not isinstance(model, str) or not model:
                raise bad_request("start needs 'new_model' (see `galleria models`)", "bad_option")
            opts = {k: body[k] for k in ("mode", "order", "seed", "calib_size") if k in body}
            mopts = body.get("model_options") or {}
            if not isinstance(mopts, dict):
                raise bad_request("model_options must be an object (e.g. {\"size\": 260})",
                                  "bad_option")
            return await writes.run(upgrades.start, model, model_options=mopts, **opts)
        if action == "run":
            lim = body.get("limit")
            return await writes.run(  # may load the new model: not on the event loop
                upgrades.run,
                limit=None if lim is None else parse_int(lim, "limit", 1, 10**9, 1),
                batch_size=parse_int(body.get("batch_size"), "batch_size", 1, 256, 16),
                commit_every=parse_int(body.get("commit_every"), "commit_every", 1, 4096, 64),
                retry_failed=parse_bool(body.get("retry_failed"), "retry_failed"))
        if action == "cancel":
            return await writes.run(upgrades.cancel)
        if action == "finish":
            return await writes.run(upgrades.finish, force=parse_bool(body.get("force"), "force"))
        raise bad_request("action must be one of start, run, cancel, finish", "bad_option")

    # ---------------------------------------------------------------- UI
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes + 2**20)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    return app


def _version() -> str:
    from galleria import __version__

    return str(__version__)
