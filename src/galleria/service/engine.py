"""The engine of one service process: the gallery, its models and its searchers.

Everything here is synchronous and thread-safe; the app runs it in the worker
pools (service/limits.py), never on the event loop.

- **One model instance per process.** :class:`ModelCache` keeps one extractor
  per fingerprint; the searchers :func:`~galleria.search.searcher.open_searcher`
  returns are given the cached instances (an ONNX Runtime session is safe to
  ``run()`` from several threads; a torch module in ``inference_mode`` too, it
  holds no state between calls). A model is warmed up once, under a lock,
  before it is shared, so no two threads build its session.
- **The searcher the gallery calls for.** The service never picks a searcher
  itself: every search asks :func:`galleria.decision.choose` (one read of the
  gallery's state) and keeps one searcher per decision (the spec is the cache
  key), so a changed state (an upgrade started or finished by any process, a new
  primary space, a new tuned default, more calibration pairs) opens the searcher
  the CLI would open. A search whose decision changed while it ran is answered
  again with the new searcher.
- **New commits without a restart.** Searches run on the store's immutable
  views; a background refresher brings the views to the latest commit every
  ``refresh_interval_s`` so the catch-up cost rarely lands on a request (a
  search still checks the generation itself: one indexed read).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from galleria.decision import SearchRequest, SearchSpec, build, choose
from galleria.errors import GalleriaError, InputError
from galleria.extract.derived import Derivers, derive_missing
from galleria.extract.queries import Queries
from galleria.filters import to_json
from galleria.images.decode import load_image, load_image_bytes
from galleria.search.contract import Searcher
from galleria.service.errors import ServiceError, from_galleria, not_found, unprocessable
from galleria.service.metrics import Metrics
from galleria.service.models import ModelCache
from galleria.service.sharded import ShardPool
from galleria.store.gallery import Gallery
from galleria.store.state import GalleryState
from galleria.tune.record import (
    PROB_DECIMALS,
    PROBABILITY_MEANING,
    TUNED_KEY,
    at_least_probability,
    searcher_probabilities,
    tuned_summary,
)
from galleria.types import MISSING_KEY, SearchResult
from galleria.upgrade.pairs import PairStore
from galleria.upgrade.querylog import record_answers
from galleria.upgrade.state import FINISHING_KEY, STATE_KEY, UpgradeState, job_folder

log = logging.getLogger(__name__)

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


#: how long :meth:`Engine.stop` waits for a background job (a refit's fit step, which is not
#: interrupted, or its wait for another process's adaptation lock)
BACKGROUND_JOIN_S = 60.0


class Engine:
    """The gallery, models and searchers of one service process."""

    def __init__(self, config: ServiceConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.gallery = Gallery.open(config.gallery)
        self.path = self.gallery.path
        self.models = ModelCache(self.path, runtime=config.runtime, threads=config.threads,
                                 warm_up=config.warm_up)
        #: the derive functions of the derived spaces (uploads fill them by a product)
        self.derivers = Derivers(self.path, runtime=config.runtime, threads=config.threads)
        # one searcher per request (pipeline name), re-opened when its decision changes
        self._searchers: dict[SearchRequest, tuple[tuple[SearchSpec, int], Searcher]] = {}
        self.pool = ShardPool(config.ray, config.shards) if config.ray else None
        self._open_lock = threading.Lock()
        self._calib_epoch = 0
        self._pairs_seen: int | None = None
        self._pairs_checked = 0.0
        self.ready = threading.Event()
        self.startup_error: str | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        #: background jobs (a fusion refit, galleria.fusion.grow.schedule_refit): stopped by
        #: ``self._stop`` and joined by :meth:`stop`
        self.background: list[threading.Thread] = []
        self.refreshes = 0
        self.refresh_errors = 0

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Open the default searcher and warm its models (in a thread), then refresh views."""
        def boot() -> None:
            try:
                self._repair_derived()
                self._open_default()
                self.refresh_once()
                self.ready.set()
            except Exception as exc:
                log.exception("service start-up failed")
                self.startup_error = f"{type(exc).__name__}: {exc}"
            while not self._stop.wait(self.config.refresh_interval_s):
                try:
                    self.refresh_once()
                    if not self.ready.is_set():
                        self._open_default()
                        self.ready.set()
                        self.startup_error = None
                except Exception as exc:
                    self.refresh_errors += 1
                    log.warning("view refresh failed: %s", exc)

        self._refresher = threading.Thread(target=boot, name="galleria-refresher", daemon=True)
        self._refresher.start()

    def _repair_derived(self) -> None:
        """Fill the derived vectors a process killed between an add's two commits left
        missing (:func:`galleria.extract.derived.derive_missing`; nothing to do: no model)."""
        try:
            n = derive_missing(self.gallery, self.derivers)
        except Exception:  # serve anyway (a derived space's model may be missing): the next
            log.exception("could not fill the missing derived vectors")  # index run retries
            return
        if n:
            log.info("filled %d missing derived vectors", n)

    def _open_default(self) -> None:
        if any(sp.count for sp in self.gallery.state().spaces):  # an empty gallery is ready
            self.searcher(None)

    def stop(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=10)
        for t in self.background:  # a refit stops at its next embedded item (resumable)
            t.join(timeout=BACKGROUND_JOIN_S)
            if t.is_alive():
                log.warning("background job %s still running after %.0f s; left to the "
                            "process exit", t.name, BACKGROUND_JOIN_S)
        for _, s in self._searchers.values():
            s.close()
        if self.pool is not None:
            self.pool.close()
        self.gallery.close()

    # --------------------------------------------------------------- state
    def request(self, pipeline: str | None) -> SearchRequest:
        """What this server asks :func:`choose` for a search with ``pipeline``."""
        try:
            return SearchRequest.of(pipeline, rule=self.config.rule,
                                    sharded=self.pool is not None)
        except InputError as exc:
            raise unprocessable(str(exc), "bad_pipeline") from exc

    def decide(self, request: SearchRequest, state: GalleryState | None = None
               ) -> tuple[SearchSpec, int]:
        """The decision for ``request`` now (one read of the gallery's state)."""
        try:
            spec = choose(state or self.gallery.state(), request)
        except InputError as exc:
            if not any(sp.count for sp in self.gallery.state().spaces):
                raise ServiceError(409, "empty_gallery",
                                   f"gallery {self.path.name} has no items yet: add items "
                                   "first (POST /v1/items or `galleria index`)") from exc
            raise unprocessable(str(exc), "unsupported") from exc
        return spec, self._calib_epoch

    def upgrade_state(self, state: GalleryState | None = None) -> UpgradeState | None:
        raw = (state or self.gallery.state()).setting(STATE_KEY)
        return UpgradeState.from_dict(raw) if raw else None

    def searcher(self, pipeline: str | None = None
                 ) -> tuple[tuple[SearchSpec, int], Searcher]:
        """``(decision, searcher)`` for ``pipeline`` (``None``: the gallery's default),
        re-opened when the decision changed."""
        request = self.request(pipeline)
        key = self.decide(request)
        cur = self._searchers.get(request)
        if cur is not None and cur[0] == key:
            return cur
        with self._open_lock:
            cur = self._searchers.get(request)
            if cur is not None and cur[0] == key:
                return cur
            for attempt in range(3):
                try:
                    if cur is not None:
                        cur[1].close()  # sharded: its shards hold the CPUs the new ones need
                    s = build(self.gallery, key[0], runtime=self.config.runtime,
                              threads=self.config.threads, shards=self.pool)
                    break
                except ImportError as exc:
                    raise unprocessable(f"pipeline {pipeline!r} is not available in this "
                                        f"installation ({exc}); use pipeline=global") from exc
                except GalleriaError:  # the state changed while opening (a finish): again
                    fresh = self.decide(request)
                    if attempt == 2 or fresh == key:
                        raise
                    key = fresh
            s.use_models(self.models.adopt)
            self._searchers[request] = (key, s)
            log.info("searching %s with %s", request.pipeline or "the default",
                     s.describe())
            return key, s

    # ------------------------------------------------------------- refresh
    def refresh_once(self) -> None:
        """Bring the views of the searched spaces to the latest commit (one read txn);
        re-open searchers whose decision changed; update gauges."""
        state = self.gallery.state()
        st = self.upgrade_state(state)
        if st is not None and time.monotonic() - self._pairs_checked > PAIRS_CHECK_S:
            self._pairs_checked = time.monotonic()
            n = PairStore(job_folder(self.gallery) / "pairs").count()
            if self._pairs_seen is not None and n != self._pairs_seen:
                self._calib_epoch += 1  # more calibration pairs: the next search re-opens
            self._pairs_seen = n
        reopened = False
        for request, (key, _) in list(self._searchers.items()):
            try:
                fresh = self.decide(request, state)
            except ServiceError:
                continue  # e.g. every item removed: requests get the error themselves
            if fresh != key:
                self.searcher(request.pipeline)
                reopened = True
        if reopened:
            self._drop_unused_models(st)
        spaces: list[str] = []
        for _, s in self._searchers.values():
            if s.kind != "sharded":  # shards follow the store's change feed themselves
                spaces += [sp for sp in s.read_spaces() if sp not in spaces]
        if spaces:
            self.gallery.views(spaces)
        self.refreshes += 1
        self._gauges(state, st)

    def _drop_unused_models(self, st: UpgradeState | None) -> None:
        """Keep the models of the current searchers, the spaces holding data and the
        upgrade's new model; forget the others (memory stays flat over upgrades)."""
        keep: set[str] = set()
        for _, s in self._searchers.values():
            keep.update(m.fingerprint for m in s.models.values())
        keep.update(sp.space for sp in self.gallery.spaces())
        if st is not None:
            keep.add(st.new_space)
        gone = self.models.retain(keep)
        if gone:
            log.info("released models no longer used: %s", gone)

    def update_gauges(self) -> None:
        """Gallery gauges as of now (``/metrics`` calls it, so a scrape never reports a
        size the background refresher has not caught up with yet)."""
        state = self.gallery.state()
        self._gauges(state, self.upgrade_state(state))

    def _gauges(self, state: GalleryState, st: UpgradeState | None) -> None:
        m = self.metrics
        m.clear_gauge("galleria_space_items")
        total = 0
        for sp in state.spaces:
            m.set_gauge("galleria_space_items", sp.count, "Items with data in a space.",
                        (("space", sp.space), ("kind", sp.kind)))
            m.set_gauge("galleria_space_generation", sp.generation,
                        "Latest committed generation of a space.", (("space", sp.space),))
            total = max(total, sp.count)
        if st is not None:
            old, new = (sp.count if sp is not None else 0
                        for sp in (state.space(st.old_space), state.space(st.new_space)))
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
                return Prepared(image=load_image_bytes(spec.image, name=spec.name,
                                                       max_pixels=self.config.max_pixels))
            return Prepared()
        except GalleriaError as exc:
            return Prepared(error=from_galleria(exc))

    def search(self, specs: list[QuerySpec], *, k: int, offset: int = 0,
               pipeline: str | None = None, return_query: bool = False,
               where: Any = None, min_score: float | None = None,
               min_probability: float | None = None) -> list[dict[str, Any]]:
        """Answer queries (one search over all usable ones); per query a response or an
        ``{"error": ...}`` entry. ``pipeline=None``: the gallery's default (as the CLI).
        ``where``: a payload filter (400 when it names a field no item has);
        ``min_score``: leave out results scoring below it (raw score);
        ``min_probability``: below this calibrated match probability (a tuned gallery)."""
        if min_probability is not None and not 0.0 <= min_probability <= 1.0:
            raise ServiceError(400, "bad_request", "min_probability must be in [0, 1]")
        if where is not None:
            try:
                where = self.gallery.bind_filter(where)
            except InputError as exc:
                raise ServiceError(400, "bad_filter", str(exc)) from exc
        opts = {k_: v for k_, v in (("where", where), ("min_score", min_score))
                if v is not None}
        prepared = [self.prepare(s) for s in specs]
        request = self.request(pipeline)
        for attempt in range(3):
            key, searcher = self.searcher(pipeline)
            try:
                out = self._search_once(searcher, specs, prepared, k=k, offset=offset,
                                        return_query=return_query, options=opts,
                                        min_probability=min_probability)
            except GalleriaError:  # e.g. the old space dropped by a finish meanwhile
                if attempt == 2 or self.decide(request) == key:
                    raise
                continue
            if self.decide(request) == key:
                return out
            log.info("search decision changed during a search; answering again")
        return out

    def _search_once(self, searcher: Searcher, specs: list[QuerySpec], prepared: list[Prepared],
                     *, k: int, offset: int, return_query: bool,
                     options: dict[str, Any] | None = None,
                     min_probability: float | None = None) -> list[dict[str, Any]]:
        need = list(searcher.spaces)
        try:
            searcher.check_options(**(options or {}))
        except InputError as exc:  # e.g. a filter during an upgrade, or on local pipelines
            raise ServiceError(400, "unsupported_option", str(exc)) from exc
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
            res = searcher.search(Queries(data), k + offset, **(options or {}))
            record_answers(self.path, res.ids)  # the backfill's query-driven order (if a job)
        prob = None if res is None else searcher_probabilities(searcher, res)
        if min_probability is not None and res is not None:
            if prob is None:
                raise ServiceError(400, "not_calibrated",
                                   "min_probability needs match probabilities: the gallery "
                                   "was not tuned for this pipeline (galleria tune), or the "
                                   "upgrade job has not calibrated its rule yet; use "
                                   "min_score (raw score)")
            res, prob = at_least_probability(res, prob, min_probability)
        info = searcher.describe()
        metas = self._metas(res) if res is not None else {}
        out: list[dict[str, Any]] = []
        for n in range(len(specs)):
            if n in errors:
                out.append({"error": errors[n]})
                continue
            assert res is not None
            r = order.index(n)
            hits = [(i, s, None if prob is None else round(float(prob[r, j]), PROB_DECIMALS))
                    for j, (i, s) in enumerate(zip(res.ids[r], res.scores[r], strict=True))
                    if i is not None][offset : offset + k]
            resp: dict[str, Any] = {
                "results": [{"id": i, "score": round(float(s), 6), "probability": p,
                             "metadata": metas.get(i)} for i, s, p in hits],
                "calibrated": prob is not None,
                "model": info["model"],
                "generation": res.generation,
                "k": k, "offset": offset,
                "searcher": info["searcher"],
                "pipeline": info["pipeline"],
                "reason": info["reason"],
            }
            if "merge" in info:
                resp["merge"] = info["merge"]
            if options and options.get("where") is not None:
                resp["filter"] = to_json(options["where"])
            if options and options.get("min_score") is not None:
                resp["min_score"] = options["min_score"]
            if min_probability is not None:
                resp["min_probability"] = min_probability
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

    def _item_rows(self, searcher: Searcher, item_id: str, need: list[str]) -> dict[str, Any]:
        key = int(self.gallery.keys_of([item_id])[0])
        if key == MISSING_KEY:
            raise not_found(f"no item {item_id!r} in this gallery")
        out: dict[str, Any] = {}
        for sp in need:
            if self.gallery.has([item_id], sp)[0]:
                try:
                    keys = np.array([key])
                    out[sp] = (self.gallery.get_local(keys, space=sp)[0]
                               if self.gallery.space_info(sp).kind == "local"
                               else self.gallery.get_vectors(keys, space=sp)[0])
                    continue
                except GalleriaError:
                    pass  # moved meanwhile: embed its image below
            ext = searcher.models.get(sp)
            path = (self.gallery.meta([item_id])[0] or {}).get("path")
            if ext is None or not path:
                raise ServiceError(409, "no_query_data",
                                   f"item {item_id!r} has no vector of {sp!r} and no stored "
                                   "image to embed")
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
        state = g.state()
        st = self.upgrade_state(state)
        spaces = [{"space": sp.space, "kind": sp.kind, "dim": sp.dim, "count": sp.count,
                   "generation": sp.generation, "index": sp.index_spec,
                   "model": sp.info.get("name"), "primary": sp.space == state.primary}
                  for sp in state.spaces]
        try:
            default: dict[str, Any] | None = choose(state, self.request(None)).to_dict()
        except (InputError, ServiceError):
            default = None  # an empty gallery
        return {
            "gallery": g.path.name,
            "items": len(g),
            "primary_space": state.primary,
            "spaces": spaces,
            "upgrade": None if st is None else {
                "old_space": st.old_space, "new_space": st.new_space,
                "new_model": st.new_model, "mode": st.mode},
            "finishing": bool(state.setting(FINISHING_KEY)),
            "searcher": default,
            "models_loaded": self.models.fingerprints(),
            "payload_fields": g.payload_fields(),
            "tuned": tuned_summary(state.setting(TUNED_KEY), state),
            "score_meaning": PROBABILITY_MEANING,
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
