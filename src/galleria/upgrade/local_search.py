"""Search a gallery while local features are being added to it (change ``local``).

The global space holds every item; the local space holds the items done. A
query is answered by two parts merged on one scale, as a model upgrade is:

- the global part: the global model over the items *without* local features
  (:func:`~galleria.upgrade.search.search_excluding`);
- the local part: the local index (ASMK) over the items with them, i.e. the
  ``local`` pipeline a fresh gallery with local features answers with.

Both parts' scores are Z-normed per query against a *cohort* of done items
(they hold both a global vector and local features): the mean and standard
deviation of the query's ``top`` highest similarities to the cohort in each
channel (the adaptive Z-norm the model upgrade uses, with the local index's
image similarities as the second channel). At 0 % this is the global search,
at 100 % the local pipeline.

The local part is the local index the job last *published*: the job saves the
local space's index as a verified snapshot at its commits (at most every
:data:`PUBLISH_EVERY_S` seconds, or twice the last save's
time, and at the end of each run; one row of the store points at the complete
snapshot). A search never builds or folds a local index: it uses the snapshot it
has loaded, and a newer one is loaded by the searcher's one loader thread (woken
when a search sees a newer publication; its connection closed when it stops at
:meth:`LocalChangeSearcher.close`) and swapped in whole. Items done after that
snapshot are answered by the global part until the next one (every item is in
exactly one part), so the answers lag the job by at most one publication and
never wait for it.

Rule (:func:`resolve_local_rule`): like a model upgrade, ``auto`` serves the
gallery's global answers (``old-only``: the global model over *every* item, the
global space stays complete: exactly the plain global search) until the job's
pseudo-query check (:mod:`galleria.upgrade.local_guard`) finds the merged answers
(``rank-merge``) better; the merge is asked for by name as ``rank-merge``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from galleria.errors import GalleriaError, InputError
from galleria.extract.queries import Queries, QueryFailure
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.search.contract import Searcher, SearchOptions
from galleria.search.pipelines import HybridPipeline, QueryBatch
from galleria.store.gallery import Gallery
from galleria.store.reader import saved_snapshot
from galleria.types import LocalFeatures, SearchResult, clamp_k
from galleria.upgrade.merge import merge_results, znorm_result
from galleria.upgrade.parts import QueryCost, search_excluding
from galleria.upgrade.probability import lookup, normalization_name
from galleria.upgrade.state import UpgradeError, UpgradeState, require_upgrade
from galleria.validate import as_embeddings

log = logging.getLogger(__name__)

COHORT_TOP = 100
MIN_COHORT = 50
MERGED = "rank-merge"
GLOBAL = "old-only"
HYBRID = "hybrid"
LOCAL_RULES = (MERGED, GLOBAL, HYBRID)
"""The rules of a local change: the merged answers, the global answers alone, and the
``hybrid`` pipeline (what a fresh gallery with both spaces answers with) over the global
space and the published local index."""
PUBLISH_EVERY_S = 10.0
"""The job publishes the local index at a commit at most this often (or twice the time
its last publication took, when longer), and at the end of each run."""


def resolve_local_rule(rule: str, state: UpgradeState) -> str:
    """``auto`` -> the rule the job's last guard check chose (``old-only`` before any
    check, or when the decision names no rule of a local change); ``rank-merge`` when
    the job runs without the guard (``state.online["local_guard"]["guard"] == "off"``);
    ``rank-merge`` / ``old-only`` as asked."""
    if rule in LOCAL_RULES:
        return rule
    if rule != "auto":
        raise UpgradeError(f"rule {rule!r} does not apply while local features are added; "
                           f"known: auto, {', '.join(LOCAL_RULES)}")
    guard = state.online.get("local_guard")
    if isinstance(guard, dict) and (guard.get("guard") == "off" or not guard.get("enabled", True)):
        return MERGED
    decision = state.online.get("decision") or {}
    chosen = decision.get("rule")
    return chosen if decision.get("checked") and chosen in LOCAL_RULES else GLOBAL


class LocalPublisher:
    """Publish the local space's index while a job adds local features (the job's
    commits call :meth:`maybe`): a saved snapshot (``Gallery.save_index``: built on a
    copy, checksummed, recorded by one row), which :class:`LocalChangeSearcher` serves.
    """

    def __init__(self, space: str, every_s: float | None = None) -> None:
        self.space = space
        self.every_s = float(PUBLISH_EVERY_S if every_s is None else every_s)
        self.last = time.monotonic()
        self.took = 0.0
        self.published = 0

    def maybe(self, gallery: Gallery, *, force: bool = False) -> bool:
        """Publish when due (``force``: now); a failure is logged (the run goes on)."""
        if not force and time.monotonic() - self.last < max(self.every_s, 2 * self.took):
            return False
        t = time.monotonic()
        try:
            if gallery.count(self.space):
                gallery.save_index(self.space)
                self.published += 1
        except (GalleriaError, OSError) as exc:
            log.warning("could not publish the local index of %s: %s", self.space, exc)
            return False
        finally:
            self.last = time.monotonic()
            self.took = self.last - t
        return True


def top_stats(sims: np.ndarray, top: int = COHORT_TOP) -> tuple[float, float]:
    """Mean and standard deviation (floored at 1e-6) of the ``top`` largest values."""
    s = np.asarray(sims, dtype=np.float64).reshape(-1)
    if s.size > top:
        s = -np.partition(-s, top - 1)[:top]
    return float(s.mean()) if s.size else 0.0, max(float(s.std()) if s.size else 1.0, 1e-6)


@dataclass(frozen=True)
class Published:
    """A local index the job published (a saved snapshot), loaded; never mutated.

    ``count`` and ``keys()``: the items it holds (what
    :func:`~galleria.upgrade.parts.search_excluding` leaves out of the global part).
    """

    folder: str
    generation: int
    index: Any
    item_keys: np.ndarray

    @property
    def count(self) -> int:
        return len(self.item_keys)

    def keys(self) -> np.ndarray:
        return self.item_keys


class _Info:
    """The calibration record the service describes a searcher with."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info


class _Without:
    """A published local index without the items removed since it was published: its
    search leaves them out (``k`` results from ``k + len(gone)``); the rest as the index."""

    def __init__(self, index: Any, gone: np.ndarray) -> None:
        self._index, self._gone = index, np.asarray(gone, np.int64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)

    def search(self, queries: Sequence[LocalFeatures], k: int) -> SearchResult:
        res = self._index.search(queries, k + self._gone.size)
        out = SearchResult.empty(len(res), k)
        for i in range(len(res)):
            keep = (res.ids[i] >= 0) & ~np.isin(res.ids[i], self._gone)
            ids, sc = res.ids[i][keep][:k], res.scores[i][keep][:k]
            out.ids[i, : ids.size], out.scores[i, : ids.size] = ids, sc
        return out


class LocalChangeSearcher(Searcher):
    """The searcher of a gallery whose job adds local features (see the module docstring).

    The searcher contract (:class:`~galleria.search.contract.Searcher`: query data
    of both spaces), plus the backfill searcher's ``state``, ``rule``, ``needs``,
    ``search_vectors`` and ``cost``.

    Args:
        gallery: the gallery under a ``local`` change.
        global_extractor, local_extractor: query models of the two spaces (None:
            search with query data only).
        cohort: how many done items form the normalisation cohort.
    """

    kind = "backfill"
    map_fingerprint = None
    """No learned map (the probability records' key)."""

    def __init__(self, gallery: Gallery, *, global_extractor: Extractor | None = None,
                 local_extractor: Extractor | None = None, cohort: int = 1000,
                 seed: int = 0, rule: str = MERGED) -> None:
        self.gallery = gallery
        self.state: UpgradeState = require_upgrade(gallery)
        if self.state.change != "local":
            raise UpgradeError("LocalChangeSearcher searches a gallery whose job adds local "
                               "features")
        if rule not in LOCAL_RULES:
            raise InputError(f"rule must be one of {', '.join(LOCAL_RULES)}, got {rule!r}")
        self.rule = rule
        self.old_extractor, self.new_extractor = global_extractor, local_extractor
        self.cohort_size, self.seed = int(cohort), int(seed)
        self.calibration = _Info(
            {"kind": f"znorm-top{COHORT_TOP}", "cohort": int(cohort),
             "channels": ["global", "local"]} if rule == MERGED else
            {"kind": "hybrid", "channels": ["global", "local"]} if rule == HYBRID else
            {"kind": "identity", "channels": ["global"]})
        self.cost = QueryCost()
        self._lock = threading.Lock()
        self._published: Published | None = None
        self._loader: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failed: str | None = None  # a published folder that did not load: not retried
        self._live: tuple[tuple[str, int], np.ndarray] | None = None
        self._cohort: tuple[str, np.ndarray, np.ndarray] | None = None
        self.loads = 0
        if rule != GLOBAL:
            self.refresh_published(wait=True)  # the snapshot there is now (not a search)

    @property
    def spaces(self) -> list[str]:  # type: ignore[override]
        """Query data of both spaces: global, local (``old-only``: global only)."""
        if self.rule == GLOBAL:
            return [self.state.old_space]
        return [self.state.old_space, self.state.new_space]

    def read_spaces(self) -> list[str]:
        """The views the service keeps fresh: the global one (the local part is the
        job's published snapshot, :meth:`refresh_published`)."""
        return [self.state.old_space]

    @property
    def models(self) -> dict[str, Extractor]:  # type: ignore[override]
        return {sp: e for sp, e in ((self.state.old_space, self.old_extractor),
                                    (self.state.new_space, self.new_extractor))
                if e is not None and sp in self.spaces}

    @models.setter
    def models(self, value: dict[str, Extractor]) -> None:
        self.old_extractor = value.get(self.state.old_space)
        self.new_extractor = value.get(self.state.new_space)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pipeline": "global+local",
                "merge": {"rule": self.rule, "old_space": self.state.old_space,
                          "new_space": self.state.new_space,
                          "calibration": dict(self.calibration.info)}}

    @classmethod
    def open(cls, gallery: Gallery, *, runtime: str = "auto", threads: int | None = None,
             with_models: bool = True, rule: str = "auto") -> LocalChangeSearcher:
        """Rebuild the query models from the spaces' records (``with_models=False``:
        search with query data only); ``rule``: :func:`resolve_local_rule` (``old-only``
        needs the global model only)."""
        state = require_upgrade(gallery)
        rule = resolve_local_rule(rule, state)
        exts = [extractor_from_space(gallery.space_info(sp).info, root=gallery.path,
                                     runtime=runtime, threads=threads, query=True)
                if with_models and (rule != GLOBAL or sp == state.old_space) else None
                for sp in (state.old_space, state.new_space)]
        return cls(gallery, global_extractor=exts[0], local_extractor=exts[1],
                   cohort=state.calib_size or 1000, seed=state.seed, rule=rule)

    def match_calibration(self) -> dict[str, Any] | None:
        """The match-probability calibration of this rule fitted by the job's last guard
        check (:mod:`galleria.upgrade.probability`), or ``None`` (not fitted for this
        rule, or the gallery moved on since: the reason is logged at debug level)."""
        try:
            state = require_upgrade(self.gallery)
        except UpgradeError:
            return None
        record = (state.online.get("decision") or {}).get("probability")
        cal, why = lookup(record, rule=self.rule, old_space=state.old_space,
                          new_space=state.new_space, job_started=state.started,
                          map_fingerprint=None, normalization=self.score_normalization(),
                          moved=self.gallery.count(state.new_space), items=len(self.gallery))
        if cal is None:
            log.debug("no match probabilities for rule %s: %s", self.rule, why)
        return cal

    def score_normalization(self) -> str:
        """The scale of this searcher's scores now (the probability records' key):
        ``hybrid`` and ``rank-merge`` answer globally until a local index is published;
        ``rank-merge`` Z-norms both parts only with a cohort of :data:`MIN_COHORT`
        published items still in the gallery (``raw``: the two parts' own scores
        below that; ``identity``: the global answers alone, nothing published)."""
        kind = normalization_name(self.calibration)
        if self.rule == GLOBAL:
            return kind
        pub = self._published
        gv = self.gallery.views([self.state.old_space]).get(self.state.old_space)
        if pub is None or not pub.count or gv is None:
            return "identity"  # hybrid and merge: the global answers alone
        if self.rule == HYBRID:
            return kind
        live = int(self._live_of(pub, gv).sum())
        return kind if min(live, self.cohort_size) >= MIN_COHORT else "raw"

    # ----------------------------------------------------------------- parts
    def published_folder(self) -> str | None:
        """The snapshot folder the store names for the local space now (one indexed read)."""
        row = self.gallery.db.one("SELECT folder FROM index_snapshots WHERE space=?",
                                  (self.state.new_space,))
        return None if row is None else str(row[0])

    def refresh_published(self, *, wait: bool = False) -> Published | None:
        """Load the job's last published local index when it is newer than the one in
        use: by the loader thread (``wait``: in this one); returns the one in use."""
        cur = self._published
        if not self._newer(self.published_folder()):
            return cur
        if wait:
            self._load()
            return self._published
        with self._lock:
            if self._stop.is_set():  # closed: keep answering with the snapshot in use
                return cur
            if self._loader is None:
                self._loader = threading.Thread(target=self._run, name="galleria-local-load",
                                                daemon=True)
                self._loader.start()
        self._wake.set()
        return cur

    def _newer(self, folder: str | None) -> bool:
        """Whether ``folder`` (the one published now) is neither in use nor refused once
        (a refused snapshot is not retried until a newer one is published)."""
        cur = self._published
        return folder is not None and folder != self._failed and \
            (cur is None or cur.folder != folder)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loader thread and wait for it (at most ``timeout`` s: a load under
        way finishes first); searches keep answering with the snapshot in use."""
        with self._lock:
            self._stop.set()
            loader = self._loader
        self._wake.set()
        if loader is not None and loader is not threading.current_thread():
            loader.join(timeout)
            if loader.is_alive():
                log.warning("the local index loader did not stop within %.1f s (a load is "
                            "under way); it stops when that load ends", timeout)

    def _run(self) -> None:
        """The loader thread: one load per wake-up until :meth:`close`; its connection to
        the database is closed when it ends."""
        try:
            while True:
                self._wake.wait()
                if self._stop.is_set():
                    return
                self._wake.clear()  # a publication seen after this is loaded by this load
                try:  # woken by several searches: load once
                    due = self._newer(self.published_folder())
                except Exception as exc:  # the loader thread must not die
                    log.warning("could not read the published local index: %s", exc)
                    continue
                if due:
                    self._load()
        finally:
            self.gallery.db.release_thread()

    def _load(self) -> None:
        """Load the published snapshot; any failure keeps the one in use (logged) and the
        folder that failed is not tried again until a newer one is published."""
        folder: str | None = None
        try:
            with self.gallery.db.read() as c:
                row = c.execute("SELECT folder FROM index_snapshots WHERE space=?",
                                (self.state.new_space,)).fetchone()
                folder = None if row is None else str(row[0])
                got = saved_snapshot(c, self.gallery.path, self.state.new_space)
            if got is None:
                if folder is not None:  # refused (damaged, stale): logged by the reader
                    self._failed = folder
                return
            folder, index, gen = got
            keys = np.asarray(index.keys(), np.int64) if len(index) else np.zeros(0, np.int64)
        except Exception as exc:  # the loader thread must not die: keep the snapshot in use
            log.warning("could not load the published local index %s (%s: %s); searches "
                        "keep the one in use", folder, type(exc).__name__, exc)
            if folder is not None:
                self._failed = folder
            return
        with self._lock:
            cur = self._published
            if cur is None or gen >= cur.generation:
                self._published = Published(folder, gen, index, keys)  # one swap
                self.loads += 1

    def _live_of(self, pub: Published, gv: Any) -> np.ndarray:
        """``(pub.count,)`` bool: which published items the global view still holds (one
        ``isin`` per snapshot and view generation, not per search)."""
        tag = (pub.folder, int(gv.generation))
        cached = self._live
        if cached is not None and cached[0] == tag:
            return cached[1]
        live = np.isin(pub.item_keys, gv.keys())
        self._live = (tag, live)
        return live

    def _cohort_of(self, pub: Published, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(keys (C,), global vectors (C, D))`` of a seeded sample of the published items
        still in the gallery (``live``: their keys)."""
        tag = f"{pub.folder}#{len(live)}"
        with self._lock:
            if self._cohort is not None and self._cohort[0] == tag:
                return self._cohort[1], self._cohort[2]
        keys = live
        if keys.size > self.cohort_size:
            keys = np.sort(np.random.default_rng(self.seed).choice(keys, self.cohort_size,
                                                                    replace=False))
        try:
            vecs = self.gallery.get_vectors(keys, space=self.state.old_space) if keys.size \
                else np.zeros((0, 1), np.float32)
        except GalleriaError:  # an item removed this instant: no cohort for this search
            return np.zeros(0, np.int64), np.zeros((0, 1), np.float32)
        with self._lock:
            self._cohort = (tag, keys, vecs)
        return keys, vecs

    # ---------------------------------------------------------------- search
    def search_queries(self, global_queries: np.ndarray, local_queries: Sequence[Any] | None,
                       k: int = 10) -> SearchResult:
        """Top-``k`` string ids for ``(Q, D)`` global query vectors and Q LocalFeatures
        (``None`` with rule ``old-only``, which reads the global ones only)."""
        if k <= 0:
            raise InputError(f"k must be positive, got {k}")
        qg = as_embeddings(global_queries, name="global queries")
        old = self.state.old_space
        if self.rule == GLOBAL:  # the global answers: every item, as plain global search
            self.cost.queries += len(qg)
            t = time.perf_counter()
            gv = self.gallery.views([old]).get(old)
            res = search_excluding(qg, k, gv, None)
            self.cost.index_searches += len(qg)
            self.cost.add_ms("search", time.perf_counter() - t)
            return SearchResult(res.scores, res.ids, {old: gv.generation if gv else 0})
        if local_queries is None:
            raise InputError(f"rule {self.rule} needs local query features")
        ql = list(local_queries)
        if len(ql) != len(qg):
            raise InputError(f"{len(qg)} global queries but {len(ql)} local ones")
        bad = [n for n, f in enumerate(ql) if not isinstance(f, LocalFeatures)]
        if bad:
            raise InputError(f"local queries {bad[:5]} are not LocalFeatures")
        self.cost.queries += len(qg)
        t = time.perf_counter()
        pub = self.refresh_published()  # never waits: a newer snapshot loads meanwhile
        gv = self.gallery.views([old]).get(old)
        gens = {old: gv.generation if gv is not None else 0}
        if self.rule == HYBRID and pub is not None and pub.count and gv is not None:
            res = self._hybrid(qg, ql, k, pub, gv)
            if res is not None:
                self.cost.add_ms("search", time.perf_counter() - t)
                return SearchResult(res.scores, res.ids, {**gens, self.state.new_space:
                                                          pub.generation})
        if pub is None or not pub.count or gv is None or self.rule == HYBRID:
            g_part = search_excluding(qg, k, gv, None)
            self.cost.add_ms("search", time.perf_counter() - t)
            return SearchResult(g_part.scores, g_part.ids, gens)
        gens[self.state.new_space] = pub.generation
        g_part = search_excluding(qg, k, gv, pub)
        index = pub.index
        live = self._live_of(pub, gv)  # items removed since the snapshot: left out
        keys, cvecs = self._cohort_of(pub, pub.item_keys[live])
        depth = min(pub.count, k + int((~live).sum()))
        sims_l: np.ndarray | None = None
        if keys.size >= MIN_COHORT and hasattr(index, "search_with_similarities"):
            res, sims_l = index.search_with_similarities(ql, depth, keys)  # one scoring each
        else:
            res = index.search(ql, depth)
        ok = np.isin(res.ids, pub.item_keys[live]) & (res.ids >= 0)
        l_part = SearchResult.empty(len(ql), k, object_ids=True)
        for r in range(len(ql)):
            cols = np.flatnonzero(ok[r])[:k]
            l_part.scores[r, : cols.size] = res.scores[r, cols]
            l_part.ids[r, : cols.size] = gv.ids.lookup(res.ids[r, cols])
        self.cost.index_searches += 2 * len(qg)
        self.cost.add_ms("search", time.perf_counter() - t)
        t = time.perf_counter()
        if keys.size >= MIN_COHORT:
            gs = qg @ cvecs.T
            stats_g = [top_stats(row) for row in gs]
            stats_l = [top_stats(row) for row in sims_l] if sims_l is not None else \
                [top_stats(index.similarities(f, keys)) for f in ql]
            mg = np.array([[m] for m, _ in stats_g], np.float32)
            sg = np.array([[s] for _, s in stats_g], np.float32)
            ml = np.array([[m] for m, _ in stats_l], np.float32)
            sl = np.array([[s] for _, s in stats_l], np.float32)
            g_part, l_part = znorm_result(g_part, mg, sg), znorm_result(l_part, ml, sl)
        out = merge_results([g_part, l_part], k)
        self.cost.add_ms("merge", time.perf_counter() - t)
        return SearchResult(out.scores, out.ids, gens)

    def _hybrid(self, qg: np.ndarray, ql: list[LocalFeatures], k: int, pub: Published,
                gv: Any) -> SearchResult | None:
        """The ``hybrid`` pipeline (default options) over the global view (every item) and
        the published local index: global and local candidates, spatially verified ones
        first; an item without local features in that snapshot verifies with none, one
        removed since it is left out. ``None`` when an item vanished during this search
        (the caller answers globally)."""
        old, new = self.state.old_space, self.state.new_space
        have = pub.item_keys

        def fetch_local(keys: np.ndarray) -> list[LocalFeatures]:
            keys = np.asarray(keys, np.int64)
            ok = np.isin(keys, have)
            got = self.gallery.get_local(keys[ok], space=new) if ok.any() else []
            out: list[LocalFeatures] = [LocalFeatures(np.zeros((0, 4), np.float32),
                                                      np.zeros((0, pub.index.dim), np.float32))
                                        ] * len(keys)
            for n, f in zip(np.flatnonzero(ok), got, strict=True):
                out[n] = f
            return out

        gone = pub.item_keys[~self._live_of(pub, gv)]  # removed since the snapshot
        local_index = pub.index if not gone.size else _Without(pub.index, gone)
        pipe = HybridPipeline(gv, local_index, lambda keys: self.gallery.get_vectors(keys,
                                                                                    space=old),
                              fetch_local=fetch_local)
        try:
            res = pipe.search(QueryBatch(vectors=qg, local=ql), clamp_k(k, gv.count))
        except GalleriaError as exc:  # an item removed this instant: the global answers
            log.info("hybrid search during the local change fell back to global: %s", exc)
            return None
        self.cost.index_searches += 2 * len(qg)
        out = SearchResult.empty(len(qg), k, object_ids=True)
        m = res.ids.shape[1]
        out.scores[:, :m] = res.scores
        out.ids[:, :m] = gv.ids.lookup(res.ids)
        return out

    def search_vectors(self, *, new_queries: Any = None, old_queries: Any = None,
                       k: int = 10) -> SearchResult:
        if old_queries is None or (new_queries is None and self.rule != GLOBAL):
            raise InputError("a local-feature change needs global query vectors and local "
                             "query features")
        return self.search_queries(old_queries, new_queries, k)

    def needs(self) -> tuple[bool, bool]:
        """Query data of the spaces: ``(global, local)`` (local: not with ``old-only``)."""
        return True, self.rule != GLOBAL

    def _search(self, queries: Queries, k: int, options: SearchOptions) -> SearchResult:
        return self.search_vectors(new_queries=queries.data.get(self.state.new_space),
                                   old_queries=queries.data.get(self.state.old_space), k=k)

    def embed_paths(self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 16,
                    workers: int = 2) -> tuple[Queries, list[int], list[QueryFailure]]:
        if len(self.models) < len(self.spaces):
            raise UpgradeError("this searcher was opened without query models")
        t = time.perf_counter()
        q, good, fails = super().embed_paths(paths, batch_size=batch_size, workers=workers)
        self.cost.add_ms("embed", time.perf_counter() - t)
        return q, good, fails
