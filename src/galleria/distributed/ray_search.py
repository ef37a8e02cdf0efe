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
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from galleria.errors import ClusterError, CompatibilityError, InputError
from galleria.extract.queries import Queries, QueryFailure
from galleria.store.gallery import Gallery
from galleria.store.views import merge_top
from galleria.types import MISSING_KEY, SearchResult
from galleria.validate import as_embeddings

log = logging.getLogger(__name__)


class ShardWorker:
    """Ray actor body: the items of one key slice of one global space."""

    def __init__(self, gallery: str, space: str, shard: int, shards: int,
                 threads: int) -> None:
        self.path, self.space = gallery, space
        self.shard, self.shards = int(shard), int(shards)
        self.threads = int(threads)
        self.g: Gallery | None = None
        self.index: Any = None
        self.ids: dict[int, str] = {}
        self.generation = -1
        self.spec: tuple[str, dict[str, Any]] | None = None
        self.loads = 0

    def _gallery(self) -> Gallery:
        if self.g is None:
            from galleria.threads import set_threads

            set_threads(self.threads)  # this worker process is an entry point
            self.g = Gallery.open(self.path, readonly=True)
        return self.g

    def refresh(self, target: int | None = None) -> dict[str, Any]:
        """Bring the slice to generation ``target`` (the latest when None or unreachable
        through the log); returns ``{generation, count, node, pid, loads}``."""
        from galleria.store import reader

        g = self._gallery()
        with g.db.read() as c:
            row = reader.space_row(c, self.space, g.path)
            if row.kind != "global":
                raise InputError(f"space {self.space!r} holds local features: sharded search "
                                 "serves global spaces")
            goal = row.generation if target is None else min(int(target), row.generation)
            same = self.index is not None and self.spec == (row.spec, row.params)
            if same and self.generation >= row.log_floor:
                if self.generation < goal:
                    self._catch_up(c, row, goal)
            elif not same or self.generation < row.log_floor:
                self._load(c, row)
        return self.info()

    def _load(self, c: Any, row: Any) -> None:
        from galleria.store import reader

        rows = c.execute(
            "SELECT v.key, i.id FROM vectors v JOIN items i ON i.key = v.key "
            "WHERE v.space=? AND v.key % ? = ? ORDER BY v.key",
            (self.space, self.shards, self.shard)).fetchall()
        keys = np.array([r[0] for r in rows], np.int64)
        index = reader.new_index(row)
        if len(keys):
            data = reader.fetch(c, self.g.path, row, keys)  # type: ignore[union-attr]
            _check_unit(data, self.space)
            index.add(keys, data)
        self.index, self.ids = index, {int(k): str(i) for k, i in rows}
        self.generation, self.spec = row.generation, (row.spec, row.params)
        self.loads += 1

    def _catch_up(self, c: Any, row: Any, goal: int) -> None:
        from galleria.store import reader
        from galleria.store.db import chunks

        last: dict[int, str] = {}
        for op, key in c.execute(
                "SELECT op, key FROM log WHERE space=? AND gen>? AND gen<=? AND key % ? = ? "
                "ORDER BY gen", (self.space, self.generation, goal, self.shards, self.shard)):
            last[int(key)] = op
        if last:
            touched = np.fromiter(last, dtype=np.int64, count=len(last))
            self.index.remove(touched)
            for k in touched:
                self.ids.pop(int(k), None)
            adds = np.array(sorted(k for k, op in last.items() if op == "add"), np.int64)
            if len(adds):
                data = reader.fetch(c, self.g.path, row, adds)  # type: ignore[union-attr]
                _check_unit(data, self.space)
                self.index.add(adds, data)
                for ch in chunks([int(k) for k in adds]):
                    q = ",".join("?" * len(ch))
                    self.ids.update((int(k), str(i)) for k, i in c.execute(
                        f"SELECT key, id FROM items WHERE key IN ({q})", ch))
        self.generation = goal

    def search(self, queries: np.ndarray, k: int, generation: int
               ) -> tuple[np.ndarray, np.ndarray, list[str | None], int]:
        """Top-``k`` of this slice at ``generation``: ``(scores, keys, ids, generation)``."""
        if self.generation != generation:
            self.refresh(generation)
        n = len(self.index)
        q = len(queries)
        if n == 0:
            res = SearchResult.empty(q, k)
        else:
            res = self.index.search(queries, min(k, n))
            if res.k < k:
                pad = SearchResult.empty(q, k)
                pad.scores[:, : res.k], pad.ids[:, : res.k] = res.scores, res.ids
                res = pad
        ids = [self.ids.get(int(x)) if x != MISSING_KEY else None for x in res.ids.reshape(-1)]
        return res.scores, res.ids, ids, self.generation

    def info(self) -> dict[str, Any]:
        import ray

        nbytes = 0
        vecs = getattr(self.index, "vectors", None)
        if vecs is not None:
            v = vecs() if callable(vecs) else vecs
            nbytes = int(getattr(v, "nbytes", 0))
        return {"shard": self.shard, "generation": self.generation,
                "count": 0 if self.index is None else len(self.index),
                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "loads": self.loads, "nbytes": nbytes}


def _check_unit(data: np.ndarray, space: str) -> None:
    norms = np.linalg.norm(data, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(np.abs(norms - 1.0) > 1e-3):
        from galleria.errors import FormatError

        raise FormatError(f"stored vectors of {space!r} are not finite unit vectors (a "
                          "damaged segment); run `galleria check` on the gallery")


class ShardedSearcher:
    """The searcher contract (``embed_paths``, ``embed_images``, ``search``) over S shards.

    Queries are embedded in this process with the space's query model (as
    :class:`~galleria.search.searcher.Searcher` does); the search runs on the shards.
    Results equal single-process exact search of the same gallery (same scores per
    item; ties broken by shard, then by key, where the single index breaks them by
    row). Thread-safe: a server may call :meth:`search` from several threads.
    """

    def __init__(self, gallery: Gallery, shards: int, *, space: str | None = None,
                 cpus_per_shard: float = 1.0, runtime: str = "auto",
                 threads: int | None = None, with_model: bool = True,
                 ready_timeout_s: float = 300.0, search_timeout_s: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from galleria.distributed.cluster import alive_nodes
        from galleria.search.searcher import Searcher
        from galleria.upgrade.state import active_upgrade

        if isinstance(shards, bool) or int(shards) < 1:
            raise InputError(f"shards must be a positive integer, got {shards!r}")
        if space is None and active_upgrade(gallery) is not None:
            raise InputError(f"{gallery.path} is being upgraded; sharded search serves one "
                             "space (finish the upgrade, or search with open_searcher)")
        self.gallery = gallery
        self.local = Searcher.open(gallery, space=space, runtime=runtime, threads=threads,
                                   with_model=with_model)
        self.space = self.local.space
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
    def embed_images(self, images: Sequence[Image.Image]) -> Queries:
        return self.local.embed_images(images)

    def embed_paths(self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 16,
                    workers: int = 2) -> tuple[Queries, list[int], list[QueryFailure]]:
        return self.local.embed_paths(paths, batch_size=batch_size, workers=workers)

    def search(self, queries: Any, k: int = 10, **options: Any) -> SearchResult:
        """Top-``k`` string ids for ``queries`` (``Queries``, ``{space: (Q, D)}`` or
        ``(Q, D)``), at one committed generation of the gallery."""
        import ray

        from galleria.index.base import check_k

        if options:
            raise InputError(f"sharded search takes no options {sorted(options)} (qe, dim "
                             "and funnel need plain search of one space)")
        k = check_k(k)
        q = Queries.of(queries, self.space)
        if self.space not in q:
            raise CompatibilityError(f"no queries for space {self.space!r}; got {list(q.data)}")
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
        for scores, keys, ids, _ in parts:
            results.append(SearchResult(scores, keys))
            names.update((int(kk), i) for kk, i in zip(keys.reshape(-1), ids, strict=True)
                         if i is not None)
        total = sum(int((keys != MISSING_KEY).any(axis=0).sum()) for _, keys, _, _ in parts)
        merged = merge_top(results, k)
        if total < k:  # k is clamped to the gallery, as Gallery.search does
            found = int((merged.ids != MISSING_KEY).any(axis=0).sum())
            merged = merged.head(max(1, found))
        out = np.full(merged.ids.shape, None, dtype=object)
        flat, fk = out.reshape(-1), merged.ids.reshape(-1)
        for n, kk in enumerate(fk):
            if kk != MISSING_KEY:
                flat[n] = names.get(int(kk))
        return SearchResult(merged.scores, out, gen)

    def search_paths(self, paths: Sequence[str | os.PathLike[str]], k: int = 10, **kw: Any
                     ) -> tuple[list[str], SearchResult | None, list[QueryFailure]]:
        from galleria.extract.queries import search_paths

        return search_paths(self, paths, k, **kw)

    # ------------------------------------------------------------ admin
    def refresh(self) -> list[dict[str, Any]]:
        """Bring every shard to the latest commit; returns their info."""
        self.shard_info = self._call([a.refresh.remote() for a in self._actors],
                                     self.search_timeout_s)
        return self.shard_info

    def _call(self, refs: list[Any], timeout: float) -> list[Any]:
        import ray

        from galleria.distributed.cluster import unwrap_task_error, worker_lost_errors

        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError as exc:
            raise ClusterError(f"the search shards did not answer within {timeout:g} s") \
                from exc
        except worker_lost_errors() as exc:
            raise ClusterError(f"a search shard was lost ({type(exc).__name__}) and could "
                               "not be restarted; open the searcher again") from exc
        except ray.exceptions.RayTaskError as exc:
            raise unwrap_task_error(exc) from None

    def close(self) -> None:
        """Kill the shard actors and release their placement group."""
        import ray

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
    from galleria.distributed.cluster import connect

    timeout = float(kw.pop("connect_timeout_s", 30.0))
    sess = connect(address, timeout_s=timeout)
    try:
        g = gallery if isinstance(gallery, Gallery) else Gallery.open(gallery, readonly=True)
    except BaseException:
        sess.close()
        raise
    try:
        s = ShardedSearcher(g, shards, **kw)
    except BaseException:
        sess.close()
        if g is not gallery:
            g.close()
        raise
    s._session = sess  # type: ignore[attr-defined]
    s._owns_gallery = not isinstance(gallery, Gallery)  # type: ignore[attr-defined]
    return s
