"""``galleria eval --local sift|xfeat --pipeline P``: local pipelines on a task.

One call of :func:`evaluate_pipeline` is one row of the local benchmark: the
task's local features (cached, :mod:`galleria.eval.local_features`), global
embeddings where the pipeline needs them (cached, :mod:`galleria.eval.embed`),
the local index built on the gallery side (cached too: training a codebook is
the slow part), the pipeline of :mod:`galleria.search.pipelines`, and the task's
official metrics on the full ranking. Gallery item ``g`` has key ``g``; a query
that is a gallery item is excluded from its own ranking when the protocol
excludes it (everything but UKBench).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from galleria.cache import cache_dir
from galleria.errors import FormatError, InputError
from galleria.eval.datasets import RetrievalTask, load_task
from galleria.eval.embed import task_embeddings
from galleria.eval.local_features import task_local_features
from galleria.extract.embed import Progress
from galleria.extractors.registry import create_extractor, model_kind
from galleria.fingerprint import digest, slug
from galleria.index.exact import ExactIndex
from galleria.local.base import LocalIndex
from galleria.local.cann import PRESETS
from galleria.local.factory import create_local_index, load_local_index
from galleria.search.pipelines import HYBRID_OPTIONS, PIPELINES, QueryBatch, make_pipeline
from galleria.types import LocalFeatures, SearchResult

log = logging.getLogger(__name__)

PIPELINE_PARAMS = {
    "global+sv": ("shortlist", "matcher", "ratio", "threshold", "max_iters"),
    "local+mds": ("k", "candidates", "p", "dim", "max_iter", "blend", "local_blend",
                  "evidence"),
    "hybrid": HYBRID_OPTIONS,
}


def build_local_index(
    kind: str, gallery: list[LocalFeatures], *, dim: int, fingerprint: str,
    params: dict[str, Any] | None = None, cache_key: str | None = None,
) -> LocalIndex:
    """A local index over ``gallery`` (keys ``0..G-1``), from the cache when possible."""
    params = dict(params or {})
    folder = None
    idx = create_local_index(kind, dim, fingerprint=fingerprint, **params)
    if cache_key is not None:
        generic = getattr(idx, "generic_codebook", lambda: None)()  # shipped codebook in use
        tag = digest(kind, params, fingerprint, cache_key,
                     *([generic.fingerprint] if generic is not None else []))
        folder = cache_dir("local-index") / f"{kind}-{slug(fingerprint)}-{tag}"
        if (folder / "header.json").is_file():
            try:
                idx = load_local_index(folder, fingerprint=fingerprint, dim=dim)
                if len(idx) == len(gallery):
                    return idx
            except FormatError as exc:
                log.warning("ignoring unreadable cached index %s: %s", folder, exc)
    idx.add(np.arange(len(gallery), dtype=np.int64), gallery)
    if folder is not None:
        idx.save(folder)
    return idx


SEARCH_CHUNK = 16
"""Queries per search call when a search progress bar is drawn."""


def _search(pipe: Any, queries: QueryBatch, k: int, progress: Progress | None) -> SearchResult:
    """``pipe.search(queries, k)``, in chunks updating ``progress`` when one is given
    (every pipeline answers each query on its own: the result is the same)."""
    q = len(queries)
    if progress is None or q <= SEARCH_CHUNK:
        res = pipe.search(queries, k)
        if progress is not None:
            progress.update(q)
        return res
    parts = []
    for a in range(0, q, SEARCH_CHUNK):
        b = min(q, a + SEARCH_CHUNK)
        sub = QueryBatch(
            vectors=None if queries.vectors is None else queries.vectors[a:b],
            local=None if queries.local is None else list(queries.local[a:b]),
            exclude=None if queries.exclude is None else queries.exclude[a:b])
        parts.append(pipe.search(sub, k).pad(k))
        progress.update(b - a)
    return SearchResult(np.concatenate([r.scores for r in parts]),
                        np.concatenate([r.ids for r in parts]))


@dataclass(frozen=True)
class LocalEvalConfig:
    """What :func:`evaluate_pipeline` runs (one row of the local benchmark).

    Attributes:
        local: local extractor (``sift``, ``xfeat``), ``local_options`` its options.
        pipeline: one of :data:`~galleria.search.pipelines.PIPELINES`.
        index: local index searched (``asmk``, ``cann``), ``index_params`` its options.
        similarity_index: index giving image-to-image similarities for ``local+mds``
            and ``hybrid`` (``asmk``; the same object when ``index`` is ``asmk`` with
            the same params).
        global_model: global extractor for ``global``, ``global+sv``, ``hybrid`` and
            the blend.
        pipeline_params: options of the pipeline (``shortlist``, ``k``, ``p`` ...).
        max_queries: search a seeded sample (``query_seed``) of this many queries
            (features of the whole task are extracted and cached as without it).
    """

    local: str = "sift"
    pipeline: str = "local"
    index: str = "asmk"
    index_params: dict[str, Any] | None = None
    similarity_index: str | None = "asmk"
    global_model: str = "effnet-lite0"
    pipeline_params: dict[str, Any] | None = None
    local_options: dict[str, Any] | None = None
    max_queries: int | None = None
    query_seed: int = 0


def sample_queries(task: RetrievalTask, n: int | None, seed: int = 0
                   ) -> tuple[RetrievalTask, np.ndarray]:
    """``(task restricted to a seeded sample of n queries, their indices (n,))``; the task
    itself and ``arange(Q)`` when it has at most ``n`` queries (or ``n`` is ``None``)."""
    q = task.num_queries
    if n is None or q <= n:
        return task, np.arange(q)
    if n < 1:
        raise InputError(f"max_queries must be >= 1; got {n}")
    keep = np.sort(np.random.default_rng(seed).choice(q, int(n), replace=False))
    kw: dict[str, Any] = {"query_paths": [task.query_paths[i] for i in keep],
                          "query_gallery_index": task.query_gallery_index[keep]}
    if task.query_labels is not None:
        kw["query_labels"] = task.query_labels[keep]
    if task.query_bbx is not None:
        kw["query_bbx"] = [task.query_bbx[i] for i in keep]
    if task.gnd is not None:
        kw["gnd"] = tuple(task.gnd[i] for i in keep)
    return replace(task, **kw), keep


def evaluate_pipeline(
    task: str | RetrievalTask,
    config: LocalEvalConfig | None = None,
    *,
    use_cache: bool = True,
    workers: int = 2,
    progress: Progress | None = None,
    search_progress: Progress | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate one pipeline on a task; returns the ``galleria eval`` JSON object.

    ``config`` says what runs (:class:`LocalEvalConfig`); keyword ``overrides``
    replace its fields (``evaluate_pipeline("smvs", pipeline="local+mds")``).
    ``progress`` is updated per image whose features are extracted (or read from the
    cache); ``search_progress`` per query searched (the queries are then searched in
    chunks of :data:`SEARCH_CHUNK`, each query independently as in one batch).
    """
    try:
        cfg = replace(config or LocalEvalConfig(), **overrides)
    except TypeError as exc:
        raise InputError(f"evaluate_pipeline: {exc}") from None
    local, pipeline, index = cfg.local, cfg.pipeline, cfg.index
    index_params, similarity_index = cfg.index_params, cfg.similarity_index
    global_model, pipeline_params, local_options = (cfg.global_model, cfg.pipeline_params,
                                                    cfg.local_options)
    t0 = time.perf_counter()
    if pipeline not in PIPELINES:
        raise InputError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
    if model_kind(local) != "local":
        raise InputError(f"{local!r} is not a local extractor (see `galleria models`)")
    if isinstance(task, str):
        task = load_task(task)
    if task.vectors_loader is not None:
        raise InputError(f"task {task.name!r} has descriptors only, no images for local features")
    pparams = dict(pipeline_params or {})
    allowed = PIPELINE_PARAMS.get(pipeline, ())
    unknown = sorted(set(pparams) - set(allowed))
    if unknown:
        raise InputError(f"pipeline {pipeline!r} takes {list(allowed)}; unknown: {unknown}")
    needs_global = pipeline in ("global", "global+sv", "hybrid") or bool(pparams.get("blend"))
    needs_local = pipeline != "global"

    g_vecs = q_vecs = None
    global_fp = None
    if needs_global:
        gext = create_extractor(global_model)
        q_vecs, g_vecs = task_embeddings(task, gext, use_cache=use_cache, workers=workers)
        global_fp = gext.fingerprint
    ext = create_extractor(local, **(local_options or {}))
    gal: list[LocalFeatures] = []
    qs: list[LocalFeatures] = []
    if needs_local:
        packed, g_rows, q_rows = task_local_features(task, ext, use_cache=use_cache,
                                                     workers=workers, progress=progress)
        gal = [packed[int(i)] for i in g_rows]
        qs = [packed[int(i)] for i in q_rows]
    t_embed = time.perf_counter() - t0

    task, keep = sample_queries(task, cfg.max_queries, cfg.query_seed)
    if q_vecs is not None:
        q_vecs = q_vecs[keep]
    qs = [qs[int(i)] for i in keep] if needs_local else qs
    G = task.num_gallery
    exclude = (np.where(task.query_gallery_index >= 0, task.query_gallery_index, -1)
               if task.exclude_self else None)
    queries = QueryBatch(vectors=q_vecs, local=qs if needs_local else None, exclude=exclude)
    cache_key = digest(task.name, G, [len(f) for f in gal]) if use_cache else None
    parts: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if pipeline in ("global", "global+sv", "hybrid"):
        gidx = ExactIndex(int(g_vecs.shape[1]))
        gidx.add(np.arange(G), g_vecs)
        parts["index"] = gidx
    t_build = time.perf_counter()
    if pipeline in ("global+sv", "hybrid"):  # hybrid: verification (verify=0 ignores it)
        parts["fetch_local"] = lambda keys: [gal[int(k)] for k in keys]
    if pipeline in ("local", "local+mds", "hybrid"):
        if index == "cann":
            index_params = {**PRESETS.get(local, {}), **(index_params or {})}
        lidx = build_local_index(index, gal, dim=ext.dim, fingerprint=ext.fingerprint,
                                 params=index_params, cache_key=cache_key)
        if pipeline == "hybrid":
            parts["local_index"] = lidx
            gv_all = g_vecs
            parts["fetch_vectors"] = lambda keys: gv_all[np.asarray(keys, np.int64)]
        else:
            parts["index"] = lidx
        info["index"] = {"type": lidx.type_name, "params": lidx.params(),
                         "bytes_per_image": round(lidx.nbytes() / max(G, 1))}
        if pipeline == "local+mds" or (pipeline == "hybrid" and pparams.get("mds_k")):
            if similarity_index in (None, index):
                sim = lidx
            else:
                sim = build_local_index(similarity_index, gal, dim=ext.dim,
                                        fingerprint=ext.fingerprint, cache_key=cache_key)
            parts["similarity"] = sim
            if pparams.get("blend"):
                assert g_vecs is not None
                gv = g_vecs
                parts["fetch_vectors"] = lambda keys: gv[np.asarray(keys, np.int64)]
            info["similarity_index"] = sim.type_name
    t_build = time.perf_counter() - t_build
    pipe = make_pipeline(pipeline, **parts, **pparams)
    t1 = time.perf_counter()
    res = _search(pipe, queries, G, search_progress)
    t_search = time.perf_counter() - t1
    metrics = task.evaluate(res.ids)
    return {
        "dataset": task.name,
        "protocol": task.protocol,
        "model": local if needs_local else global_model,
        "pipeline": pipeline,
        "local": ({"model": local, "fingerprint": ext.fingerprint, "config": ext.config(),
                   "keypoints_per_image": round(float(np.mean([len(f) for f in gal])), 1)}
                  if needs_local else None),
        "global_model": global_model if needs_global else None,
        "global_fingerprint": global_fp,
        "fingerprint": ext.fingerprint if needs_local else global_fp,
        "dim": ext.dim if needs_local else int(g_vecs.shape[1]),
        "queries": task.num_queries,
        "gallery": G,
        "pipeline_params": pipe.params() if hasattr(pipe, "params") else {},
        **info,
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "top1": res.ids[:, 0].astype(np.int64).tolist(),  # gallery row of each first result
        "seconds": round(time.perf_counter() - t0, 2),
        "embed_seconds": round(t_embed, 2),
        "index_seconds": round(t_build, 2),
        "search_ms_per_query": round(1000 * t_search / max(task.num_queries, 1), 2),
    }
