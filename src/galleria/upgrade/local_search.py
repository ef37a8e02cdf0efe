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
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.extract.queries import Queries, QueryFailure
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.search.contract import Searcher, SearchOptions
from galleria.store.gallery import Gallery
from galleria.store.reader import merge_view
from galleria.types import LocalFeatures, SearchResult
from galleria.upgrade.merge import merge_results, znorm_result
from galleria.upgrade.parts import QueryCost, search_excluding
from galleria.upgrade.state import UpgradeError, UpgradeState, require_upgrade
from galleria.validate import as_embeddings

log = logging.getLogger(__name__)

COHORT_TOP = 100
MIN_COHORT = 50


def top_stats(sims: np.ndarray, top: int = COHORT_TOP) -> tuple[float, float]:
    """Mean and standard deviation (floored at 1e-6) of the ``top`` largest values."""
    s = np.asarray(sims, dtype=np.float64).reshape(-1)
    if s.size > top:
        s = -np.partition(-s, top - 1)[:top]
    return float(s.mean()) if s.size else 0.0, max(float(s.std()) if s.size else 1.0, 1e-6)


class _Info:
    """The calibration record the service describes a searcher with."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info


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
    rule = "rank-merge"

    def __init__(self, gallery: Gallery, *, global_extractor: Extractor | None = None,
                 local_extractor: Extractor | None = None, cohort: int = 1000,
                 seed: int = 0) -> None:
        self.gallery = gallery
        self.state: UpgradeState = require_upgrade(gallery)
        if self.state.change != "local":
            raise UpgradeError("LocalChangeSearcher searches a gallery whose job adds local "
                               "features")
        self.old_extractor, self.new_extractor = global_extractor, local_extractor
        self.cohort_size, self.seed = int(cohort), int(seed)
        self.calibration = _Info({"kind": f"znorm-top{COHORT_TOP}", "cohort": int(cohort),
                                  "channels": ["global", "local"]})
        self.cost = QueryCost()
        self._lock = threading.Lock()
        self._local: tuple[int, Any] | None = None
        self._cohort: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def spaces(self) -> list[str]:  # type: ignore[override]
        """Query data of both spaces: global, local."""
        return [self.state.old_space, self.state.new_space]

    @property
    def models(self) -> dict[str, Extractor]:  # type: ignore[override]
        return {sp: e for sp, e in ((self.state.old_space, self.old_extractor),
                                    (self.state.new_space, self.new_extractor))
                if e is not None}

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
             with_models: bool = True) -> LocalChangeSearcher:
        """Rebuild both query models from the spaces' records (``with_models=False``:
        search with query data only)."""
        state = require_upgrade(gallery)
        exts = [extractor_from_space(gallery.space_info(sp).info, root=gallery.path,
                                     runtime=runtime, threads=threads, query=True)
                if with_models else None
                for sp in (state.old_space, state.new_space)]
        return cls(gallery, global_extractor=exts[0], local_extractor=exts[1],
                   cohort=state.calib_size or 1000, seed=state.seed)

    # ----------------------------------------------------------------- parts
    def _local_index(self, view: Any) -> Any:
        """One index of everything in the local view (base + delta folded, on a copy)."""
        if view.delta is None and not len(view.removed):
            return view.base
        with self._lock:
            if self._local is not None and self._local[0] == view.generation:
                return self._local[1]

            idx = merge_view(view, force=True).base
            self._local = (view.generation, idx)
            return idx

    def _cohort_of(self, view: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(keys (C,), global vectors (C, D))`` of a seeded sample of the done items."""
        with self._lock:
            if self._cohort is not None and self._cohort[0] == view.generation:
                return self._cohort[1], self._cohort[2]
        keys = view.keys()
        if keys.size > self.cohort_size:
            keys = np.sort(np.random.default_rng(self.seed).choice(keys, self.cohort_size,
                                                                    replace=False))
        vecs = self.gallery.get_vectors(keys, space=self.state.old_space) if keys.size else \
            np.zeros((0, 1), np.float32)
        with self._lock:
            self._cohort = (view.generation, keys, vecs)
        return keys, vecs

    # ---------------------------------------------------------------- search
    def search_queries(self, global_queries: np.ndarray, local_queries: Sequence[Any],
                       k: int = 10) -> SearchResult:
        """Top-``k`` string ids for ``(Q, D)`` global query vectors and Q LocalFeatures."""
        if k <= 0:
            raise InputError(f"k must be positive, got {k}")
        qg = as_embeddings(global_queries, name="global queries")
        ql = list(local_queries)
        if len(ql) != len(qg):
            raise InputError(f"{len(qg)} global queries but {len(ql)} local ones")
        bad = [n for n, f in enumerate(ql) if not isinstance(f, LocalFeatures)]
        if bad:
            raise InputError(f"local queries {bad[:5]} are not LocalFeatures")
        old, new = self.state.old_space, self.state.new_space
        self.cost.queries += len(qg)
        t = time.perf_counter()
        views = self.gallery.views([old, new])
        gv, lv = views.get(old), views.get(new)
        g_part = search_excluding(qg, k, gv, lv)
        if lv is None or not lv.count:
            self.cost.add_ms("search", time.perf_counter() - t)
            return SearchResult(g_part.scores, g_part.ids,
                                {sp: v.generation for sp, v in views.items()})
        index = self._local_index(lv)
        res = index.search(ql, min(k, lv.count))
        l_part = SearchResult.empty(len(ql), k, object_ids=True)
        kk = res.ids.shape[1]
        l_part.scores[:, :kk] = res.scores
        l_part.ids[:, :kk] = lv.ids.lookup(res.ids)
        self.cost.index_searches += 2 * len(qg)
        self.cost.add_ms("search", time.perf_counter() - t)
        t = time.perf_counter()
        keys, cvecs = self._cohort_of(lv)
        if keys.size >= MIN_COHORT:
            gs = qg @ cvecs.T
            stats_g = [top_stats(row) for row in gs]
            stats_l = [top_stats(index.similarities(f, keys)) for f in ql]
            mg = np.array([[m] for m, _ in stats_g], np.float32)
            sg = np.array([[s] for _, s in stats_g], np.float32)
            ml = np.array([[m] for m, _ in stats_l], np.float32)
            sl = np.array([[s] for _, s in stats_l], np.float32)
            g_part, l_part = znorm_result(g_part, mg, sg), znorm_result(l_part, ml, sl)
        out = merge_results([g_part, l_part], k)
        self.cost.add_ms("merge", time.perf_counter() - t)
        return SearchResult(out.scores, out.ids, {sp: v.generation for sp, v in views.items()})

    def search_vectors(self, *, new_queries: Any = None, old_queries: Any = None,
                       k: int = 10) -> SearchResult:
        if new_queries is None or old_queries is None:
            raise InputError("a local-feature change needs global query vectors and local "
                             "query features")
        return self.search_queries(old_queries, new_queries, k)

    def needs(self) -> tuple[bool, bool]:
        """Query data of both spaces: ``(global, local)``."""
        return True, True

    def _search(self, queries: Queries, k: int, options: SearchOptions) -> SearchResult:
        return self.search_vectors(new_queries=queries.data.get(self.state.new_space),
                                   old_queries=queries.data.get(self.state.old_space), k=k)

    def embed_paths(self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 16,
                    workers: int = 2) -> tuple[Queries, list[int], list[QueryFailure]]:
        if len(self.models) < 2:
            raise UpgradeError("this searcher was opened without query models")
        t = time.perf_counter()
        q, good, fails = super().embed_paths(paths, batch_size=batch_size, workers=workers)
        self.cost.add_ms("embed", time.perf_counter() - t)
        return q, good, fails
