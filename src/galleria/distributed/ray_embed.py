"""Decoding and embedding on a Ray cluster; one committer (this process) writes the store.

:class:`RayEmbedder` is an :class:`~galleria.extract.embed.Embedder`: the
single-process jobs (:func:`galleria.extract.job.index_images`,
:func:`galleria.upgrade.job.run_upgrade`) take it in place of
:func:`~galleria.extract.embed.embed_stream`, so what is to do (derived from the
store), item identity, the commits (one transaction per batch, under the writer
lock, by this process only), failures and reports are the very same code; only
where embeddings are computed differs. Workers never open the store for writing.

Work goes out in chunks (one inference batch each) to a pool of actors, each
holding one model built from the extractor's config (extractors pickle as their
config; the network is built on the worker). Each actor decodes its chunk with
:func:`~galleria.extract.embed.embed_stream` (threaded decoding, batched
inference) and has ``in_flight`` chunks queued so it never waits for the driver.

Failures: a chunk whose actor (or node) dies is put back and goes to another
actor; a replacement actor is started when the cluster has room. A chunk is
yielded once, when its result arrives, so every image is committed exactly once;
a chunk lost with its worker is embedded again, never committed twice. When no
actor is left for ``no_worker_timeout_s`` the run stops with a ClusterError
(everything committed is kept; the same command resumes). When the driver
dies, its actors die with it; the store says what is done.

Images are read by the workers from the paths the items record: every node
must see them under the same path (a shared file system).

Why actors and not Ray Data ``map_batches``: Ray Data needs ``ray[data]``
(pandas, pyarrow) on top of ``ray[default]``, turns every batch into an
Arrow/pandas block (our outputs are ragged for local features), and its
streaming executor owns retries and ordering, whereas the committer needs to
know exactly which items a result holds. A pool of plain actors gives that
with one ``ray.wait`` loop. Measured overhead against the single-process job:
``benchmarks/results/ray.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from galleria.distributed.cluster import (
    cluster_cpus,
    import_modules,
    session,
    unwrap_task_error,
    worker_lost_errors,
)
from galleria.errors import ClusterError, InputError
from galleria.extract.embed import Batch, Progress, embed_stream
from galleria.extract.job import index_images
from galleria.extractors.base import Extractor
from galleria.extractors.registry import extractor_from_config
from galleria.images.sources import SourceItem
from galleria.threads import set_threads
from galleria.upgrade.job import run_upgrade

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractorSpec:
    """What a worker needs to build the same extractor: its config, the folder relative
    paths resolve against, the runtime and the fingerprint it must make."""

    config: dict[str, Any]
    root: str | None
    runtime: str
    fingerprint: str
    kind: str

    @classmethod
    def of(cls, extractor: Extractor) -> ExtractorSpec:
        try:
            config = extractor.config()
        except NotImplementedError as exc:
            raise InputError(
                f"{extractor!r} records no config, so it cannot be built on Ray workers; "
                "create it with galleria.extractors.registry.create_extractor") from exc
        ex = getattr(extractor, "_exec_options", None) or {}
        return cls(config, getattr(extractor, "_config_root", None),
                   str(ex.get("runtime", "auto")), extractor.fingerprint, extractor.kind)


class _Serialised:
    """An extractor whose ``embed_prepared`` runs one call at a time (decoding of the
    next chunk overlaps inference of this one; inference never oversubscribes)."""

    def __init__(self, ext: Extractor, lock: threading.Lock) -> None:
        self._ext = ext
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ext, name)

    def embed_prepared(self, per_scale: Any) -> Any:
        with self._lock:
            return self._ext.embed_prepared(per_scale)


class EmbedWorker:
    """Ray actor body: one model, embeds chunks of items (``max_concurrency`` > 1 lets the
    next chunk decode while this one is inferred)."""

    def __init__(self, spec: ExtractorSpec, threads: int, imports: Sequence[str]) -> None:
        self.spec = spec
        self.threads = int(threads)
        self.imports = list(imports)
        self._ext: Any = None
        self._lock = threading.Lock()
        self._build = threading.Lock()

    def load(self) -> dict[str, Any]:
        """Build the model (once); returns where this worker runs."""

        import ray  # lazy: ray

        with self._build:
            if self._ext is None:
                import_modules(self.imports)
                set_threads(self.threads)  # this worker process is an entry point
                ext = extractor_from_config(self.spec.config, root=self.spec.root,
                                            runtime=self.spec.runtime, threads=self.threads,
                                            fingerprint=self.spec.fingerprint)
                self._ext = _Serialised(ext, self._lock)
        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def embed(self, items: list[SourceItem], batch_size: int, workers: int) -> list[Batch]:
        self.load()
        return list(embed_stream(items, self._ext, batch_size=batch_size, workers=workers))


_REMOTE: Any = None


def _remote_worker() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray  # lazy: ray

        _REMOTE = ray.remote(EmbedWorker)
    return _REMOTE


@dataclass
class _Actor:
    handle: Any
    ready: Any  # ObjectRef of load()
    started: float
    up: bool = False
    load: int = 0
    node: str = ""


class RayEmbedder:
    """An :class:`~galleria.extract.embed.Embedder` that embeds on a connected Ray cluster.

    Args:
        actors: pool size (default: the cluster's CPUs // ``cpus_per_actor``).
        cpus_per_actor: CPUs each actor reserves (and inference threads it uses).
        in_flight: chunks queued per actor.
        decode_threads: decoding threads per actor (default: the job's ``workers``).
        max_attempts: a chunk whose worker died this many times stops the run.
        no_worker_timeout_s: stop when no actor is alive for this long.
        imports: modules each worker imports first (your own registered extractors).
        strategy: Ray scheduling strategy of the actors (``SPREAD``: across nodes).

    Use as a context manager (or call :meth:`close`) to release the actors. One pool
    per extractor is kept between calls (a backfill calls once per chunk of items).
    """

    def __init__(self, *, actors: int | None = None, cpus_per_actor: float = 1.0,
                 in_flight: int = 2, decode_threads: int | None = None,
                 max_attempts: int = 3, no_worker_timeout_s: float = 120.0,
                 imports: Sequence[str] = (), strategy: str = "SPREAD") -> None:
        if actors is not None and int(actors) < 1:
            raise InputError(f"actors must be >= 1, got {actors}")
        if cpus_per_actor <= 0:
            raise InputError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
        if in_flight < 1 or max_attempts < 1:
            raise InputError("in_flight and max_attempts must be >= 1")
        self.actors = None if actors is None else int(actors)
        self.cpus_per_actor = float(cpus_per_actor)
        self.in_flight = int(in_flight)
        self.decode_threads = decode_threads
        self.max_attempts = int(max_attempts)
        self.no_worker_timeout_s = float(no_worker_timeout_s)
        self.imports = tuple(imports)
        self.strategy = strategy
        self._spec: ExtractorSpec | None = None
        self._pool: list[_Actor] = []
        self._want = 0
        self.stats = {"chunks": 0, "retried_chunks": 0, "lost_actors": 0, "started_actors": 0}
        self.served: dict[str, int] = {}
        """Chunks embedded per node id."""

    # ------------------------------------------------------------ pool
    def _target(self) -> int:
        if self.actors is not None:
            return self.actors

        return max(1, int(cluster_cpus() // self.cpus_per_actor))

    def _start_actor(self) -> _Actor:
        assert self._spec is not None
        cls = _remote_worker()
        threads = max(1, round(self.cpus_per_actor))
        h = cls.options(num_cpus=self.cpus_per_actor, max_concurrency=self.in_flight + 1,
                        max_restarts=0, scheduling_strategy=self.strategy).remote(
            self._spec, threads, self.imports)
        self.stats["started_actors"] += 1
        return _Actor(h, h.load.remote(), time.monotonic())

    def _ensure_pool(self, extractor: Extractor) -> None:
        spec = ExtractorSpec.of(extractor)
        if self._spec is not None and self._spec == spec and self._pool:
            return
        self.close()
        self._spec = spec
        self._want = self._target()
        self._pool = [self._start_actor() for _ in range(self._want)]

    def close(self) -> None:
        """Kill the actors (their processes free the CPUs at once)."""
        if not self._pool:
            return
        import ray  # lazy: ray

        for a in self._pool:
            try:
                ray.kill(a.handle, no_restart=True)
            except Exception as exc:  # already gone with its node
                log.debug("kill actor: %s", exc)
        self._pool = []

    def __enter__(self) -> RayEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm(self, extractor: Extractor, *, timeout_s: float = 600.0) -> float:
        """Start the pool for ``extractor`` and wait until every actor has built its model;
        returns the seconds it took (benchmarks separate start-up from throughput)."""
        import ray  # lazy: ray

        t0 = time.perf_counter()
        self._ensure_pool(extractor)
        lost = worker_lost_errors()
        # a worker lost while starting (its node died) is replaced, as during a run
        while True:
            pending = [a.ready for a in self._pool if not a.up]
            if not pending:
                return time.perf_counter() - t0
            left = timeout_s - (time.perf_counter() - t0)
            done = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))[0] \
                if left > 0 else []
            if not done:
                raise ClusterError(f"the embedding workers did not start within "
                                   f"{timeout_s:g} s (does the cluster have the CPUs asked "
                                   "for?)")
            for ref in done:
                self._came_up(ref, lost)
            self._replace_lost()

    def nodes(self) -> list[str]:
        """Node ids of the actors that are up."""
        return [a.node for a in self._pool if a.up]

    # ------------------------------------------------------------ run
    def __call__(self, items: Sequence[SourceItem], extractor: Extractor, *,
                 batch_size: int = 32, workers: int = 2,
                 progress: Progress | None = None) -> Iterator[Batch]:
        """Embed ``items`` on the cluster; yields one Batch per chunk, as chunks finish."""
        # workers do not share this process's working directory: ship absolute paths
        items = [it if it.path.is_absolute() else dataclasses.replace(it, path=it.path.absolute())
                 for it in items]
        if not items:
            return
        import ray  # lazy: ray

        lost = worker_lost_errors()
        self._ensure_pool(extractor)
        decode = int(self.decode_threads or workers)
        chunks = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
        todo: deque[int] = deque(range(len(chunks)))
        attempts = [0] * len(chunks)
        running: dict[Any, tuple[_Actor, int]] = {}
        idle_since: float | None = None
        while todo or running:
            self._submit(todo, running, chunks, batch_size, decode)
            waiting = list(running) + [a.ready for a in self._pool if not a.up]
            if not waiting:
                raise ClusterError("no worker could be started on the Ray cluster")
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            if not [a for a in self._pool if a.up]:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > self.no_worker_timeout_s:
                    raise ClusterError(
                        f"no embedding worker has been alive on the Ray cluster for "
                        f"{self.no_worker_timeout_s:g} s ({len(todo)} of {len(chunks)} "
                        "chunks left); everything committed is kept: run the same "
                        "command again when the cluster has room")
            else:
                idle_since = None
            for ref in done:
                if ref in running:
                    actor, c = running.pop(ref)
                    actor.load -= 1
                    try:
                        batches = ray.get(ref)
                    except lost as exc:
                        self._lose(actor, exc)
                        attempts[c] += 1
                        if attempts[c] >= self.max_attempts:
                            raise ClusterError(
                                f"a chunk of {len(chunks[c])} images lost its worker "
                                f"{attempts[c]} times (last: {type(exc).__name__}); "
                                "everything committed is kept: run the same command "
                                "again") from exc
                        self.stats["retried_chunks"] += 1
                        todo.appendleft(c)
                        continue
                    except ray.exceptions.RayTaskError as exc:
                        raise unwrap_task_error(exc) from None
                    self.stats["chunks"] += 1
                    self.served[actor.node] = self.served.get(actor.node, 0) + 1
                    if progress is not None:
                        progress.update(len(chunks[c]))
                    yield from batches
                else:
                    self._came_up(ref, lost)
            self._replace_lost()

    def _submit(self, todo: deque[int], running: dict[Any, tuple[_Actor, int]],
                chunks: list[list[SourceItem]], batch_size: int, decode: int) -> None:
        # round-robin over the actors that are up, least loaded first
        while todo:
            up = [a for a in self._pool if a.up and a.load < self.in_flight]
            if not up:
                return
            a = min(up, key=lambda x: x.load)
            c = todo.popleft()
            running[a.handle.embed.remote(chunks[c], batch_size, decode)] = (a, c)
            a.load += 1

    def _came_up(self, ref: Any, lost: tuple[type[BaseException], ...]) -> None:
        import ray  # lazy: ray

        for a in list(self._pool):
            if a.ready is not ref:
                continue
            try:
                a.node = ray.get(ref)["node"]
                a.up = True
            except lost as exc:
                self._lose(a, exc)
            except ray.exceptions.RayTaskError as exc:  # the model cannot be built there
                raise unwrap_task_error(exc) from None

    def _lose(self, actor: _Actor, exc: BaseException) -> None:
        if actor in self._pool:
            self._pool.remove(actor)
            self.stats["lost_actors"] += 1
            log.warning("an embedding worker on node %s was lost (%s); its chunks go to "
                        "the others", actor.node or "?", type(exc).__name__)

    def _replace_lost(self) -> None:
        # keep the pool at its size; a replacement waits (pending) until a node has room
        while len(self._pool) < self._want:
            self._pool.append(self._start_actor())


def ray_index_images(src: Any, out: Any, *, address: str, actors: int | None = None,
                     cpus_per_actor: float = 1.0, imports: Sequence[str] = (),
                     connect_timeout_s: float = 30.0, **kw: Any) -> Any:
    """:func:`galleria.extract.job.index_images` with embeddings computed on the Ray
    cluster at ``address``; every other argument is the single-process one."""

    with session(address, timeout_s=connect_timeout_s), \
            RayEmbedder(actors=actors, cpus_per_actor=cpus_per_actor, imports=imports) as emb:
        return index_images(src, out, embedder=emb, **kw)


def ray_run_upgrade(gallery_path: Any, *, address: str, actors: int | None = None,
                    cpus_per_actor: float = 1.0, imports: Sequence[str] = (),
                    connect_timeout_s: float = 30.0, **kw: Any) -> Any:
    """:func:`galleria.upgrade.job.run_upgrade` with embeddings computed on the Ray cluster."""

    with session(address, timeout_s=connect_timeout_s), \
            RayEmbedder(actors=actors, cpus_per_actor=cpus_per_actor, imports=imports) as emb:
        return run_upgrade(gallery_path, embedder=emb, **kw)
