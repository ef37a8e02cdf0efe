"""Sharded search on a Ray cluster: S shard actors, queries fanned out, top-k merged.

Shard ``s`` of ``S`` holds the items whose int64 key ``% S == s`` (balanced as the
gallery grows, since keys are handed out in insertion order). Each shard loads its
slice from the store itself (read-only; the gallery folder must be on a file system
every node sees) into an index of the space's own spec, and follows new commits
through the store's change log: a search carries the generation the driver read
(one indexed read), a shard behind it replays the log rows of its keys up to
exactly that generation, so all shards answer at one committed state. The
per-shard top-k lists (scores computed exactly as the single-process index does)
are merged by :func:`galleria.store.views.merge_top`.

Shards are placed one per node when the cluster has as many nodes
(a ``STRICT_SPREAD`` placement group), else spread as evenly as Ray can.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from galleria.decision.choose import SearchRequest, choose
from galleria.distributed.cluster import alive_nodes, connect, unwrap_task_error, worker_lost_errors
from galleria.errors import ClusterError, CompatibilityError, InputError
from galleria.extract.queries import Queries
from galleria.extractors.base import Extractor
from galleria.search.contract import Searcher, SearchOptions
from galleria.search.searcher import PlainSearcher
from galleria.store.gallery import Gallery
from galleria.store.views import KeyFilter, SpaceView
from galleria.threads import set_threads
from galleria.types import MISSING_KEY, SearchResult, clamp_k, merge_top
from galleria.validate import as_embeddings

log = logging.getLogger(__name__)


class ShardWorker:
    """Ray actor body: a view of one key slice of one global space.

    The view is the store's (:meth:`Gallery.shard_view`): built from the data of the
    slice, then derived from the change log on a copy and swapped, like every
    reader's view; a search never mutates an index.
    """

    def __init__(self, gallery: str, space: str, shard: int, shards: int,
                 threads: int) -> None:
        self.path, self.space = gallery, space
        self.keys = KeyFilter(int(shards), int(shard))
        self.threads = int(threads)
        self.g: Gallery | None = None
        self.view: SpaceView | None = None
        self.loads = 0

    def _gallery(self) -> Gallery:
        if self.g is None:
            set_threads(self.threads)  # this worker process is an entry point
            self.g = Gallery.open(self.path, readonly=True)
        return self.g

    def refresh(self, target: int | None = None) -> dict[str, Any]:
        """Bring the slice to the latest commit (at least ``target``); returns
        ``{generation, count, node, pid, loads}``."""
        if self.view is not None and target is not None and self.view.generation >= target:
            return self.info()
        view = self._gallery().shard_view(self.space, self.keys)
        if view.kind != "global":
            raise InputError(f"space {self.space!r} holds local features: sharded search "
                             "serves global spaces")
        if self.view is None or view.base is not self.view.base:
            self.loads += 1
        self.view = view
        return self.info()

    def search(self, queries: np.ndarray, k: int, generation: int
               ) -> tuple[np.ndarray, np.ndarray, list[str | None], int, int]:
        """Top-``k`` of this slice at ``generation`` or later: ``(scores, keys, ids,
        generation, items in the slice)``."""
        if self.view is None or self.view.generation != generation:
            self.refresh(generation)
        view = self.view
        assert view is not None
        res = view.search(queries, k).pad(k)
        ids = list(view.ids.lookup(res.ids).reshape(-1))
        return res.scores, res.ids, ids, view.generation, view.count

    def info(self) -> dict[str, Any]:
        import ray  # optional dependency (the ray extra)

        view = self.view
        nbytes = 0
        vecs = getattr(view.base, "vectors", None) if view is not None else None
        if vecs is not None:
            v = vecs() if callable(vecs) else vecs
            nbytes = int(getattr(v, "nbytes", 0))
        return {"shard": self.keys.shard, "generation": -1 if view is None else view.generation,
                "count": 0 if view is None else view.count,
                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "loads": self.loads, "nbytes": nbytes}


class ShardedSearcher(Searcher):
    """The searcher contract over S shards of one global space.

    Queries are embedded in this process with the space's query model (as
    :class:`~galleria.search.searcher.PlainSearcher` does); the search runs on the shards.
    Results equal single-process exact search of the same gallery (same scores per
    item; ties broken by shard, then by key, where the single index breaks them by
    row). Thread-safe: a server may call :meth:`search` from several threads.
    """

    kind = "sharded"

    def __init__(self, gallery: Gallery, shards: int, *, space: str | None = None,
                 cpus_per_shard: float = 1.0, runtime: str = "auto",
                 threads: int | None = None, with_model: bool = True,
                 ready_timeout_s: float = 300.0, search_timeout_s: float = 120.0) -> None:
        import ray  # lazy: ray
        from ray.util.placement_group import placement_group, remove_placement_group  # lazy: ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # lazy: ray

        if isinstance(shards, bool) or int(shards) < 1:
            raise InputError(f"shards must be a positive integer, got {shards!r}")
        self.gallery = gallery
        self.local = PlainSearcher.open(gallery, space=space, runtime=runtime, threads=threads,
                                        with_model=with_model)
        self.space = self.local.space
        self.spaces = [self.space]
        info = gallery.space_info(self.space)
        if info.kind != "global":
            raise InputError(f"space {self.space!r} holds local features: sharded search "
                             "serves global spaces")
        self.dim = info.dim
        self.shards = int(shards)
        self.search_timeout_s = float(search_timeout_s)
        n_nodes = len(alive_nodes())
        self.strategy = "STRICT_SPREAD" if self.shards <= n_nodes else "SPREAD"
        self._pg = placement_group([{"CPU": cpus_per_shard}] * self.shards,
                                   strategy=self.strategy)
        self._remove_pg = remove_placement_group
        try:
            ray.get(self._pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            self._remove_pg(self._pg)
            raise ClusterError(
                f"cannot place {self.shards} shards of {cpus_per_shard:g} CPU "
                f"({self.strategy}) on the cluster's {n_nodes} nodes within "
                f"{ready_timeout_s:g} s; use fewer shards or less CPU per shard") from exc
        try:
            cls = ray.remote(ShardWorker)
            th = max(1, round(cpus_per_shard))
            self._actors = [
                cls.options(num_cpus=cpus_per_shard, max_restarts=3, max_task_retries=3,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                self._pg, placement_group_bundle_index=i)).remote(
                    os.path.abspath(str(gallery.path)), self.space, i, self.shards, th)
                for i in range(self.shards)]
            self.shard_info = self._call([a.refresh.remote() for a in self._actors],
                                         ready_timeout_s)
        except BaseException:
            self.close()
            raise
        self.generation = max(s["generation"] for s in self.shard_info)

    # ------------------------------------------------------------ contract
    @property
    def models(self) -> dict[str, Extractor]:  # type: ignore[override]
        """The query model (shared with the in-process plain searcher)."""
        return self.local.models

    @models.setter
    def models(self, value: dict[str, Extractor]) -> None:
        self.local.models = dict(value)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pipeline": "global", "shards": self.shards}

    def _search(self, q: Queries, k: int, options: SearchOptions) -> SearchResult:
        """Top-``k`` string ids at one committed generation of the gallery."""
        import ray  # optional dependency (the ray extra)

        if not getattr(self, "_actors", None):
            raise ClusterError("this sharded searcher is closed; open another one")
        x = np.asarray(q[self.space])
        got = x.shape[-1] if x.ndim in (1, 2) else None
        if got != self.dim:
            raise CompatibilityError(f"query vectors have dimension {got} but space "
                                     f"{self.space!r} holds vectors of dimension {self.dim}")
        x = as_embeddings(x, name="queries", dim=self.dim)
        gen = self.gallery.generation(self.space)
        ref = ray.put(x)
        for _ in range(4):
            parts = self._call([a.search.remote(ref, k, gen) for a in self._actors],
                               self.search_timeout_s)
            gens = {p[3] for p in parts}
            if gens == {gen}:
                break
            gen = max(gens)  # a shard (re)loaded past it: bring the others there too
        else:
            raise ClusterError(f"the shards did not agree on one generation ({sorted(gens)})")
        self.generation = gen
        names: dict[int, str] = {}
        results = []
        for scores, keys, ids, _, _ in parts:
            results.append(SearchResult(scores, keys))
            names.update((int(kk), i) for kk, i in zip(keys.reshape(-1), ids, strict=True)
                         if i is not None)
        # k is clamped to the gallery, as Gallery.search does
        merged = merge_top(results, k).head(clamp_k(k, sum(p[4] for p in parts)))
        out = np.full(merged.ids.shape, None, dtype=object)
        flat, fk = out.reshape(-1), merged.ids.reshape(-1)
        for n, kk in enumerate(fk):
            if kk != MISSING_KEY:
                flat[n] = names.get(int(kk))
        return SearchResult(merged.scores, out, gen)

    # ------------------------------------------------------------ admin
    def refresh(self) -> list[dict[str, Any]]:
        """Bring every shard to the latest commit; returns their info."""
        self.shard_info = self._call([a.refresh.remote() for a in self._actors],
                                     self.search_timeout_s)
        return self.shard_info

    def _call(self, refs: list[Any], timeout: float) -> list[Any]:
        import ray  # lazy: ray

        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError as exc:
            raise ClusterError(f"the search shards did not answer within {timeout:g} s") \
                from exc
        except worker_lost_errors() as exc:
            raise ClusterError(f"a search shard was lost ({type(exc).__name__}) and could "
                               "not be restarted; open the searcher again") from exc
        except getattr(ray.exceptions, "TaskPlacementGroupRemoved", ()) as exc:
            raise ClusterError("this sharded searcher was closed while it searched; open "
                               "another one") from exc
        except ray.exceptions.RayTaskError as exc:
            raise unwrap_task_error(exc) from None

    def close(self) -> None:
        """Kill the shard actors and release their placement group."""
        import ray  # lazy: ray

        for a in getattr(self, "_actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception as exc:
                log.debug("kill shard: %s", exc)
        self._actors = []
        if getattr(self, "_pg", None) is not None:
            try:
                self._remove_pg(self._pg)
            except Exception as exc:
                log.debug("remove placement group: %s", exc)
            self._pg = None
        if getattr(self, "_owns_gallery", False):
            self.gallery.close()
            self._owns_gallery = False
        sess = getattr(self, "_session", None)
        if sess is not None:
            sess.close()
            self._session = None

    def __enter__(self) -> ShardedSearcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_sharded_searcher(gallery: Gallery | str | os.PathLike[str], address: str,
                          shards: int, **kw: Any) -> ShardedSearcher:
    """Connect to the Ray cluster at ``address`` and open ``shards`` shards of the gallery.

    ``kw``: :class:`ShardedSearcher` options (``space``, ``cpus_per_shard``, ``runtime``,
    ``threads``, ``connect_timeout_s``). The searcher owns the connection when it made it:
    :meth:`ShardedSearcher.close` disconnects.
    """

    timeout = float(kw.pop("connect_timeout_s", 30.0))
    sess = connect(address, timeout_s=timeout)
    try:
        g = gallery if isinstance(gallery, Gallery) else Gallery.open(gallery, readonly=True)
    except BaseException:
        sess.close()
        raise
    try:
        spec = choose(g.state(), SearchRequest(space=kw.get("space"), sharded=True))
        if spec.kind not in ("sharded", "plain"):
            raise InputError(f"{g.path} is searched by the {spec.kind} searcher now "
                             f"({spec.reason}); sharded search serves one global space: "
                             "search it with galleria.open_searcher")
        kw["space"] = spec.space
        s = ShardedSearcher(g, shards, **kw)
        s.spec = spec
    except BaseException:
        sess.close()
        if g is not gallery:
            g.close()
        raise
    s._session = sess  # type: ignore[attr-defined]
    s._owns_gallery = not isinstance(gallery, Gallery)  # type: ignore[attr-defined]
    return s
