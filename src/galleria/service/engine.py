"""The engine of one service process: the gallery, its models and its searchers.

Everything here is synchronous and thread-safe; the app runs it in the worker
pools (service/limits.py), never on the event loop.

- **One model instance per process.** :class:`ModelCache` keeps one extractor
  per fingerprint; the searchers :func:`~galleria.search.searcher.open_searcher`
  returns are given the cached instances (an ONNX Runtime session is safe to
  ``run()`` from several threads; a torch module in ``inference_mode`` too, it
  holds no state between calls). A model is warmed up once, under a lock,
  before it is shared, so no two threads build its session.
- **The searcher the gallery calls for.** The service never picks plain or
  backfill search itself: it asks ``open_searcher`` again whenever the
  gallery's search state changes (an upgrade started or finished by any
  process, a new primary space, more calibration pairs). A search whose state
  changed while it ran is answered again with the new searcher.
- **New commits without a restart.** Searches run on the store's immutable
  views; a background refresher brings the views to the latest commit every
  ``refresh_interval_s`` so the catch-up cost rarely lands on a request (a
  search still checks the generation itself: one indexed read).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from galleria.errors import GalleriaError
from galleria.extract.queries import Queries
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.service.errors import ServiceError, not_found, unprocessable
from galleria.service.metrics import Metrics
from galleria.service.sharded import ShardPool, is_sharded
from galleria.store.gallery import Gallery
from galleria.types import MISSING_KEY, SearchResult
from galleria.upgrade.querylog import record_answers
from galleria.upgrade.state import FINISHING_KEY, STATE_KEY, UpgradeState, job_folder

log = logging.getLogger(__name__)

STATE_KEYS = ("primary_space", STATE_KEY, FINISHING_KEY)
NORM_TOLERANCE = 1e-3
PAIRS_CHECK_S = 2.0


@dataclass
class ServiceConfig:
    """What ``galleria serve`` was told (see cli/serve.py for the defaults' reasons)."""

    gallery: Path
    token: str | None = None
    token_reads: bool = False
    workers: int = 2
    queue: int = 32
    write_queue: int = 16
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_k: int = 1000
    max_offset: int = 10_000
    max_batch: int = 64
    max_meta_bytes: int = 16_384
    refresh_interval_s: float = 0.25
    thumbnail_cache_bytes: int = 32 * 2**20
    runtime: str = "auto"
    threads: int | None = None
    rule: str = "auto"
    warm_up: bool = True
    ray: str | None = None  # Ray address: global search on shards (service/sharded.py)
    shards: int = 2


# ----------------------------------------------------------------- models
class ModelCache:
    """One extractor instance per fingerprint, warmed up before it is shared."""

    def __init__(self, root: Path, *, runtime: str, threads: int | None, warm_up: bool) -> None:
        self.root = root
        self.runtime = runtime
        self.threads = threads
        self.warm_up = warm_up
        self._models: dict[str, Extractor] = {}
        self._lock = threading.Lock()

    def adopt(self, ext: Extractor) -> Extractor:
        """The shared instance of ``ext``'s fingerprint (``ext`` itself the first time)."""
        fp = ext.fingerprint
        with self._lock:
            cur = self._models.get(fp)
            if cur is not None:
                return cur
            if self.warm_up and ext.kind == "global":
                t = time.perf_counter()
                ext.embed_images([Image.new("RGB", (64, 64), (127, 127, 127))])
                log.info("warmed up %s in %.2f s", fp, time.perf_counter() - t)
            self._models[fp] = ext
            return ext

    def for_space(self, info: dict[str, Any], *, query: bool) -> Extractor:
        """The extractor a space records (gallery side, or its query model)."""
        cfg = info.get("query_config") if query and info.get("query_config") else \
            info.get("config")
        fp = info.get("fingerprint") if cfg is info.get("config") else None
        if fp is not None:
            with self._lock:
                cur = self._models.get(fp)
            if cur is not None:
                return cur
        ext = extractor_from_space(info, root=self.root, runtime=self.runtime,
                                   threads=self.threads, query=query)
        return self.adopt(ext)

    def fingerprints(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def retain(self, keep: set[str]) -> list[str]:
        """Forget models not in ``keep`` (e.g. the old model after an upgrade finished);
        returns their fingerprints. Requests still using one keep their reference."""
        with self._lock:
            gone = [fp for fp in self._models if fp not in keep]
            for fp in gone:
                del self._models[fp]
        return gone


def share_models(searcher: Any, models: ModelCache) -> Any:
    """Give ``searcher`` the process's shared model instances (attributes ``*extractor``)."""
    for attr in ("extractor", "old_extractor", "new_extractor", "query_extractor"):
        ext = getattr(searcher, attr, None)
        if isinstance(ext, Extractor):
            setattr(searcher, attr, models.adopt(ext))
    return searcher


def query_spaces(searcher: Any) -> list[str]:
    """The spaces whose query data ``searcher.search`` needs (in order)."""
    if hasattr(searcher, "needs") and hasattr(searcher, "state"):
        need_old, need_new = searcher.needs()
        st = searcher.state
        return [s for s, n in ((st.old_space, need_old), (st.new_space, need_new)) if n]
    space = getattr(searcher, "space", None)
    return [space] if space else list(getattr(searcher, "spaces", []))


def searched_spaces(searcher: Any) -> list[str]:
    """The gallery spaces ``searcher`` reads (whose views the refresher keeps fresh)."""
    st = getattr(searcher, "state", None)
    if isinstance(st, UpgradeState):
        return [st.old_space, st.new_space]
    space = getattr(searcher, "space", None)
    return [space] if space else list(getattr(searcher, "spaces", []))


def query_extractor(searcher: Any, space: str) -> Extractor | None:
    st = getattr(searcher, "state", None)
    if isinstance(st, UpgradeState):
        return searcher.old_extractor if space == st.old_space else searcher.new_extractor
    return getattr(searcher, "extractor", None)


def describe(searcher: Any) -> dict[str, Any]:
    """What answered: the model, and for a backfill the spaces, rule and calibration."""
    st = getattr(searcher, "state", None)
    if isinstance(st, UpgradeState):
        cal = searcher.calibration
        info = dict(cal.info) if hasattr(cal, "info") else {}
        return {"model": st.new_space, "searcher": "backfill",
                "merge": {"rule": searcher.rule, "old_space": st.old_space,
                          "new_space": st.new_space, "calibration": info}}
    return {"model": getattr(searcher, "space", None), "searcher": type(searcher).__name__}


# ----------------------------------------------------------------- queries
@dataclass
class QuerySpec:
    """One query as parsed from a request: exactly one of the fields is set."""

    image: bytes | None = None
    embeddings: dict[str, Any] | None = None
    item_id: str | None = None
    name: str = "image"


@dataclass
class Prepared:
    """A query turned into data: a decoded image, or vectors per space."""

    image: Image.Image | None = None
    vectors: dict[str, np.ndarray] | None = None
    error: ServiceError | None = None


class Engine:
    """The gallery, models and searchers of one service process."""

    def __init__(self, config: ServiceConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.gallery = Gallery.open(config.gallery)
        self.path = self.gallery.path
        self.models = ModelCache(self.path, runtime=config.runtime, threads=config.threads,
                                 warm_up=config.warm_up)
        self._searchers: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self.pool = ShardPool(config.ray, config.shards) if config.ray else None
        self._open_lock = threading.Lock()
        self._calib_epoch = 0
        self._pairs_seen: int | None = None
        self._pairs_checked = 0.0
        self.ready = threading.Event()
        self.startup_error: str | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self.refreshes = 0
        self.refresh_errors = 0

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Open the default searcher and warm its models (in a thread), then refresh views."""
        def boot() -> None:
            try:
                if self.gallery.primary_space is not None:
                    self.searcher("global")
                self.refresh_once()
                self.ready.set()
            except Exception as exc:
                log.exception("service start-up failed")
                self.startup_error = f"{type(exc).__name__}: {exc}"
            while not self._stop.wait(self.config.refresh_interval_s):
                try:
                    self.refresh_once()
                    if not self.ready.is_set():
                        self.searcher("global")
                        self.ready.set()
                        self.startup_error = None
                except Exception as exc:
                    self.refresh_errors += 1
                    log.warning("view refresh failed: %s", exc)

        self._refresher = threading.Thread(target=boot, name="galleria-refresher", daemon=True)
        self._refresher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=10)
        if self.pool is not None:
            for _, s in self._searchers.values():
                self.pool.release(s)
            self.pool.close()
        self.gallery.close()

    # --------------------------------------------------------------- state
    def state_token(self) -> tuple[Any, ...]:
        """The settings that decide which searcher answers (one read)."""
        q = ",".join("?" * len(STATE_KEYS))
        rows = dict(self.gallery.db.all(f"SELECT key, value FROM settings WHERE key IN ({q})",
                                        STATE_KEYS))
        return tuple(json.loads(rows[k]) if k in rows else None for k in STATE_KEYS)

    def upgrade_state(self, token: tuple[Any, ...] | None = None) -> UpgradeState | None:
        token = token or self.state_token()
        raw = token[1]
        return UpgradeState.from_dict(raw) if raw else None

    def searcher(self, pipeline: str = "global") -> tuple[tuple[Any, ...], Any]:
        """``(state token, searcher)`` for ``pipeline``, re-opened when the state changed."""
        token = (*self.state_token(), self._calib_epoch)
        cur = self._searchers.get(pipeline)
        if cur is not None and cur[0] == token:
            return cur
        with self._open_lock:
            cur = self._searchers.get(pipeline)
            if cur is not None and cur[0] == token:
                return cur
            from galleria.search.searcher import open_searcher

            if token[0] is None:
                raise ServiceError(409, "empty_gallery",
                                   f"gallery {self.path.name} has no embedding space yet: add "
                                   "items first (POST /v1/items or `galleria index`)")
            for attempt in range(3):
                try:
                    if cur is not None and self.pool is not None:
                        self.pool.release(cur[1])  # its shards hold the CPUs
                    if self.pool is not None and self.pool.serves(pipeline, token):
                        s = self.pool.open(self.gallery, runtime=self.config.runtime,
                                           threads=self.config.threads)
                    else:
                        s = open_searcher(self.gallery, pipeline=pipeline,
                                          rule=self.config.rule,
                                          runtime=self.config.runtime,
                                          threads=self.config.threads)
                    break
                except ImportError as exc:
                    raise unprocessable(f"pipeline {pipeline!r} is not available in this "
                                        f"installation ({exc}); use pipeline=global") from exc
                except GalleriaError:  # the state changed while opening (a finish): again
                    fresh = (*self.state_token(), self._calib_epoch)
                    if attempt == 2 or fresh == token:
                        raise
                    token = fresh
            share_models(s, self.models)
            self._searchers[pipeline] = (token, s)
            log.info("searching %s with %s", pipeline, describe(s))
            return token, s

    # ------------------------------------------------------------- refresh
    def refresh_once(self) -> None:
        """Bring the views of the searched spaces to the latest commit (one read txn);
        re-open searchers whose state changed; update gauges."""
        token = self.state_token()
        st = self.upgrade_state(token)
        if st is not None and time.monotonic() - self._pairs_checked > PAIRS_CHECK_S:
            self._pairs_checked = time.monotonic()
            from galleria.upgrade.pairs import PairStore

            n = PairStore(job_folder(self.gallery) / "pairs").count()
            if self._pairs_seen is not None and n != self._pairs_seen:
                self._calib_epoch += 1  # more calibration pairs: the next search re-opens
            self._pairs_seen = n
        reopened = False
        for pipeline, (tok, _) in list(self._searchers.items()):
            if tuple(tok[:-1]) != token or tok[-1] != self._calib_epoch:
                self.searcher(pipeline)
                reopened = True
        if reopened:
            self._drop_unused_models(st)
        spaces: list[str] = []
        for _, s in self._searchers.values():
            if not is_sharded(s):  # shards follow the change log themselves
                spaces += [sp for sp in searched_spaces(s) if sp not in spaces]
        if spaces:
            self.gallery.views(spaces)
        self.refreshes += 1
        self._gauges(st)

    def _drop_unused_models(self, st: UpgradeState | None) -> None:
        """Keep the models of the current searchers, the spaces holding data and the
        upgrade's new model; forget the others (memory stays flat over upgrades)."""
        keep: set[str] = set()
        for _, s in self._searchers.values():
            for attr in ("extractor", "old_extractor", "new_extractor", "query_extractor"):
                ext = getattr(s, attr, None)
                if isinstance(ext, Extractor):
                    keep.add(ext.fingerprint)
        keep.update(sp.space for sp in self.gallery.spaces())
        if st is not None:
            keep.add(st.new_space)
        gone = self.models.retain(keep)
        if gone:
            log.info("released models no longer used: %s", gone)

    def update_gauges(self) -> None:
        """Gallery gauges as of now (``/metrics`` calls it, so a scrape never reports a
        size the background refresher has not caught up with yet)."""
        self._gauges(self.upgrade_state(self.state_token()))

    def _gauges(self, st: UpgradeState | None) -> None:
        m = self.metrics
        m.clear_gauge("galleria_space_items")
        total = 0
        for sp in self.gallery.spaces():
            m.set_gauge("galleria_space_items", sp.count, "Items with data in a space.",
                        (("space", sp.space), ("kind", sp.kind)))
            m.set_gauge("galleria_space_generation", self.gallery.generation(sp.space),
                        "Latest committed generation of a space.", (("space", sp.space),))
            total = max(total, sp.count)
        if st is not None:
            old, new = (self.gallery.space_info(s).count if self.gallery.has_space(s) else 0
                        for s in (st.old_space, st.new_space))
            frac = new / (old + new) if old + new else 1.0
            m.set_gauge("galleria_upgrade_fraction", frac,
                        "Fraction of the items moved to the new model (1 when no upgrade).")
            m.set_gauge("galleria_upgrade_active", 1, "1 while an upgrade is in progress.")
            total = old + new
        else:
            m.set_gauge("galleria_upgrade_fraction", 1.0,
                        "Fraction of the items moved to the new model (1 when no upgrade).")
            m.set_gauge("galleria_upgrade_active", 0, "1 while an upgrade is in progress.")
        m.set_gauge("galleria_gallery_items", total, "Items searchable in the gallery.")

    # -------------------------------------------------------------- search
    def prepare(self, spec: QuerySpec) -> Prepared:
        """Decode the image of a query (errors are returned, not raised)."""
        try:
            if spec.image is not None:
                from galleria.images.decode import load_image_bytes

                return Prepared(image=load_image_bytes(spec.image, name=spec.name,
                                                       max_pixels=self.config.max_pixels))
            return Prepared()
        except GalleriaError as exc:
            from galleria.service.errors import from_galleria

            return Prepared(error=from_galleria(exc))

    def search(self, specs: list[QuerySpec], *, k: int, offset: int = 0,
               pipeline: str = "global", return_query: bool = False) -> list[dict[str, Any]]:
        """Answer queries (one search over all usable ones); per query a response or an
        ``{"error": ...}`` entry."""
        prepared = [self.prepare(s) for s in specs]
        for attempt in range(3):
            token, searcher = self.searcher(pipeline)
            try:
                out = self._search_once(searcher, specs, prepared, k=k, offset=offset,
                                        return_query=return_query)
            except GalleriaError:  # e.g. the old space dropped by a finish meanwhile
                if attempt == 2 or self.state_token() == tuple(token[:-1]):
                    raise
                continue
            if self.state_token() == tuple(token[:-1]):
                return out
            log.info("search state changed during a search; answering again")
        return out

    def _search_once(self, searcher: Any, specs: list[QuerySpec], prepared: list[Prepared],
                     *, k: int, offset: int, return_query: bool) -> list[dict[str, Any]]:
        need = query_spaces(searcher)
        errors: dict[int, ServiceError] = {}
        rows: dict[int, dict[str, np.ndarray]] = {}
        images: list[tuple[int, Image.Image]] = []
        for n, (spec, prep) in enumerate(zip(specs, prepared, strict=True)):
            try:
                if prep.error is not None:
                    raise prep.error
                if prep.image is not None:
                    images.append((n, prep.image))
                elif spec.embeddings is not None:
                    rows[n] = self._embedding_rows(spec.embeddings, need)
                elif spec.item_id is not None:
                    rows[n] = self._item_rows(searcher, spec.item_id, need)
                else:
                    raise ServiceError(400, "bad_request", "no query given")
            except ServiceError as exc:
                errors[n] = exc
            except GalleriaError as exc:
                from galleria.service.errors import from_galleria

                errors[n] = from_galleria(exc)
        if images:
            q = searcher.embed_images([im for _, im in images])
            for j, (n, _) in enumerate(images):
                rows[n] = {sp: q[sp][j] for sp in need}
        order = [n for n in range(len(specs)) if n in rows]
        res: SearchResult | None = None
        if order:
            data: dict[str, Any] = {}
            for sp in need:
                col = [rows[n][sp] for n in order]
                data[sp] = np.stack(col).astype(np.float32) \
                    if all(isinstance(c, np.ndarray) for c in col) else col
            res = searcher.search(Queries(data), k + offset)
            record_answers(self.path, res.ids)  # the backfill's query-driven order (if a job)
        info = describe(searcher)
        metas = self._metas(res) if res is not None else {}
        out: list[dict[str, Any]] = []
        for n in range(len(specs)):
            if n in errors:
                out.append({"error": errors[n]})
                continue
            assert res is not None
            r = order.index(n)
            hits = [(i, s) for i, s in zip(res.ids[r], res.scores[r], strict=True)
                    if i is not None][offset : offset + k]
            resp: dict[str, Any] = {
                "results": [{"id": i, "score": round(float(s), 6), "metadata": metas.get(i)}
                            for i, s in hits],
                "model": info["model"],
                "generation": res.generation,
                "k": k, "offset": offset,
                "searcher": info["searcher"],
            }
            if "merge" in info:
                resp["merge"] = info["merge"]
            if return_query:
                resp["query"] = {sp: np.asarray(rows[n][sp], dtype=float).tolist()
                                 for sp in need if isinstance(rows[n][sp], np.ndarray)}
            out.append(resp)
        return out

    def _metas(self, res: SearchResult) -> dict[str, Any]:
        ids = sorted({i for i in res.ids.reshape(-1) if i is not None})
        return {i: public_meta(m) for i, m in zip(ids, self.gallery.meta(ids), strict=True)}

    def _embedding_rows(self, given: dict[str, Any], need: list[str]) -> dict[str, np.ndarray]:
        known = {s.space: s for s in self.gallery.spaces()}
        for fp in given:
            if fp not in known:
                raise unprocessable(
                    f"model {fp!r} is not a space of this gallery; it holds "
                    f"{sorted(known)}", "incompatible")
        missing = [sp for sp in need if sp not in given]
        if missing:
            why = "; the gallery is being upgraded and the merge rule needs both" \
                if len(need) > 1 else ""
            raise unprocessable(
                f"this search needs query embeddings of {need} (one per model{why}); missing "
                f"{missing}. Send the image instead to let the server embed it", "incompatible")
        out = {}
        for sp in need:
            out[sp] = check_query_vector(given[sp], known[sp].dim, sp)
        return out

    def _item_rows(self, searcher: Any, item_id: str, need: list[str]) -> dict[str, np.ndarray]:
        key = int(self.gallery.keys_of([item_id])[0])
        if key == MISSING_KEY:
            raise not_found(f"no item {item_id!r} in this gallery")
        out: dict[str, np.ndarray] = {}
        for sp in need:
            have = self.gallery.db.one("SELECT 1 FROM vectors WHERE key=? AND space=?",
                                       (key, sp)) is not None
            if have:
                try:
                    out[sp] = self.gallery.get_vectors(np.array([key]), space=sp)[0]
                    continue
                except GalleriaError:
                    pass  # moved meanwhile: embed its image below
            ext = query_extractor(searcher, sp)
            path = (self.gallery.meta([item_id])[0] or {}).get("path")
            if ext is None or not path:
                raise ServiceError(409, "no_query_data",
                                   f"item {item_id!r} has no vector of {sp!r} and no stored "
                                   "image to embed")
            from galleria.images.decode import load_image

            try:
                img = load_image(path)
            except GalleriaError as exc:
                raise ServiceError(409, "no_query_data",
                                   f"item {item_id!r} has no vector of {sp!r} and its image "
                                   f"cannot be read ({exc})") from exc
            out[sp] = ext.embed_images([img])[0]
        return out

    # ----------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        g = self.gallery
        token = self.state_token()
        st = self.upgrade_state(token)
        spaces = []
        for sp in g.spaces():
            spaces.append({"space": sp.space, "kind": sp.kind, "dim": sp.dim, "count": sp.count,
                           "generation": g.generation(sp.space), "index": g.index_spec(sp.space),
                           "model": sp.info.get("name"), "primary": sp.space == token[0]})
        cur = self._searchers.get("global")
        return {
            "gallery": g.path.name,
            "items": len(g),
            "primary_space": token[0],
            "spaces": spaces,
            "upgrade": None if st is None else {
                "old_space": st.old_space, "new_space": st.new_space,
                "new_model": st.new_model, "mode": st.mode},
            "finishing": bool(token[2]),
            "searcher": describe(cur[1]) if cur is not None else None,
            "models_loaded": self.models.fingerprints(),
            "limits": {"max_k": self.config.max_k, "max_offset": self.config.max_offset,
                       "max_batch": self.config.max_batch,
                       "max_upload_bytes": self.config.max_upload_bytes,
                       "max_pixels": self.config.max_pixels},
            "auth": {"writes": self.config.token is not None,
                     "reads": bool(self.config.token and self.config.token_reads)},
            "ready": self.ready.is_set(),
        }


def public_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Item metadata as the API shows it (server file paths left out)."""
    if meta is None:
        return None
    return {k: v for k, v in meta.items() if k != "path"}


def check_query_vector(x: Any, dim: int, space: str) -> np.ndarray:
    """A query embedding from a client: ``dim`` finite numbers of norm 1."""
    if not isinstance(x, list) or not x or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
        raise unprocessable(f"the embedding for {space!r} must be a list of {dim} numbers",
                            "invalid")
    v = np.asarray(x, dtype=np.float64)
    if v.shape != (dim,):
        raise unprocessable(f"space {space!r} holds vectors of dimension {dim}; the embedding "
                            f"has {v.shape[0]}", "incompatible")
    if not np.isfinite(v).all():
        raise unprocessable("the embedding contains NaN or infinity", "invalid")
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise unprocessable("the embedding is all zeros; it matches nothing", "invalid")
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise unprocessable(f"the embedding has norm {norm:.4g}; the gallery compares unit "
                            "vectors by cosine: L2-normalise it", "invalid")
    return v.astype(np.float32)
