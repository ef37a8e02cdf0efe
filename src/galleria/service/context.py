"""What every route is given: the engine, auth, worker pools, upgrade runner and
thumbnail cache of one served gallery (built once by ``create_app``, injected into
the routers with FastAPI's ``Depends``), and the request-body helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from galleria.service.auth import Auth
from galleria.service.engine import Engine, QuerySpec, ServiceConfig
from galleria.service.errors import ServiceError, bad_request
from galleria.service.items import ThumbnailCache
from galleria.service.limits import WorkerPool
from galleria.service.metrics import Metrics
from galleria.service.requests import (
    SEARCH_KEYS,
    check_fields,
    parse_json_body,
    query_from_json,
    search_options,
)
from galleria.service.upgrades import UpgradeRunner


@dataclass
class ServiceContext:
    """The parts of one served gallery (see the module docstring)."""

    config: ServiceConfig
    engine: Engine
    metrics: Metrics
    auth: Auth
    reads: WorkerPool
    writes: WorkerPool
    upgrades: UpgradeRunner
    thumbs: ThumbnailCache

    def guard(self, request: Request, *, write: bool) -> None:
        """Refuse a request without the token its kind needs (401 / 403)."""
        self.auth.check(request.headers.get("authorization"), write=write)

    def need_ready(self) -> None:
        """503 (with Retry-After) until the models are loaded and the views built."""
        if not self.engine.ready.is_set():
            why = f": {self.engine.startup_error}" if self.engine.startup_error else ""
            raise ServiceError(503, "starting", f"the server is starting (loading models){why}",
                               headers={"Retry-After": "2"})

    # ------------------------------------------------------------- bodies
    async def body(self, request: Request) -> tuple[str, Any]:
        """``("multipart", form)`` or ``("json", object)``; 415 for anything else."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=self.config.max_batch, max_fields=64)
            except ServiceError:
                raise
            except Exception as exc:
                raise bad_request(f"malformed multipart body: {exc}", "bad_multipart") from exc
            return "multipart", form
        if ctype in ("application/json", ""):
            return "json", parse_json_body(await request.body())
        raise ServiceError(415, "unsupported_media_type",
                           f"send multipart/form-data or application/json, not {ctype!r}")

    async def file_bytes(self, upload: Any, name: str) -> tuple[bytes, str]:
        """The bytes and file name of an uploaded file (413 past the upload limit)."""
        if isinstance(upload, str) or upload is None:
            raise bad_request(f"'{name}' must be an uploaded file", "bad_multipart")
        data = await upload.read()
        if len(data) > self.config.max_upload_bytes:
            raise ServiceError(413, "too_large", f"the image is larger than the limit of "
                               f"{self.config.max_upload_bytes} bytes")
        return data, upload.filename or name

    async def one_query(self, request: Request) -> tuple[QuerySpec, dict[str, Any]]:
        """The query and search options of ``POST /v1/search`` (multipart or JSON)."""
        kind, body = await self.body(request)
        params = dict(request.query_params)
        cfg = self.config
        check_fields(params, SEARCH_KEYS, "query string")
        check_fields(body.keys(), SEARCH_KEYS, "search request")
        if kind == "multipart":
            src = {**params, **{k: v for k, v in body.items() if isinstance(v, str)}}
            if len(body.getlist("where")) > 1:  # several conditions, all must hold
                src["where"] = [w for w in body.getlist("where") if isinstance(w, str)]
            opts = search_options(src, cfg)
            if body.get("image") is not None:
                data, fname = await self.file_bytes(body.get("image"), "image")
                if src.get("id"):
                    raise bad_request("give either an image or an id, not both", "bad_query")
                return QuerySpec(image=data, name=fname), opts
            if src.get("id"):
                return query_from_json({"id": src["id"]}, cfg), opts
            raise bad_request("upload the query image as multipart field 'image' (or give "
                              "'id')", "bad_query")
        opts = search_options({**params, **body}, cfg)
        return query_from_json(body, cfg), opts


def service(request: Request) -> ServiceContext:
    """The context of the gallery this request is for (a FastAPI dependency): the one
    named by the ``{gallery}`` of ``/v1/galleries/{gallery}/...``, else the server's only
    gallery."""
    st = request.app.state
    name = request.path_params.get("gallery")
    if name is not None:
        ctx = st.contexts.get(name)
        if ctx is None:
            raise ServiceError(404, "no_gallery", f"no gallery {name!r} on this server; "
                               f"it serves {sorted(st.contexts)} (GET /v1/galleries)")
        return ctx  # type: ignore[no-any-return]
    if st.ctx is None:
        raise ServiceError(404, "several_galleries",
                           f"this server serves several galleries ({sorted(st.contexts)}): "
                           "use /v1/galleries/{name}/... (GET /v1/galleries lists them)")
    return st.ctx  # type: ignore[no-any-return]


def all_contexts(request: Request) -> dict[str, ServiceContext]:
    """Every gallery the server serves, by name."""
    return request.app.state.contexts  # type: ignore[no-any-return]


def gallery_name(gallery: str = Path(description="a gallery's name (GET /v1/galleries)")
                 ) -> str:
    """The ``{gallery}`` path parameter of the multi-gallery routes (declared for the
    OpenAPI document; :func:`service` reads it)."""
    return gallery


Ctx = Annotated[ServiceContext, Depends(service)]
"""A handler parameter annotated ``ctx: Ctx`` receives the served gallery's context."""
