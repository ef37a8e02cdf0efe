"""The local pipelines over a gallery: the searcher contract for ``global+sv``,
``local`` and ``local+mds`` (and ``global`` in a gallery that also holds local
features).

:func:`open_pipeline` finds the gallery's local space (and its global space, if
any), rebuilds the query models from the spaces' records (fingerprint checked)
and returns a :class:`PipelineSearcher` (which pipeline answers when none is
named is decided by :func:`galleria.decision.choose`)::

    s = open_pipeline(gallery, "local+mds")
    queries, good, failures = s.embed_paths(paths)    # a blank query is a failure here
    result = s.search(queries, k=10)                  # SearchResult with string ids

Every search reads one consistent snapshot of the spaces it uses
(:meth:`Gallery.views`); the local index of that snapshot is folded into one
index (base + delta, on a copy, cached per generation) so image-to-image
similarities of any two results come from one index.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from galleria.errors import InputError
from galleria.extract.queries import Queries, QueryFailure
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.local.asmk import AsmkIndex
from galleria.search.contract import Searcher, SearchOptions
from galleria.search.pipelines import (
    PIPELINES,
    GlobalPipeline,
    GlobalSVPipeline,
    HybridPipeline,
    LocalMDSPipeline,
    LocalPipeline,
    QueryBatch,
)
from galleria.store.gallery import Gallery
from galleria.store.reader import merge_view
from galleria.store.views import SpaceView
from galleria.types import LocalFeatures, SearchResult, clamp_k

log = logging.getLogger(__name__)

NO_KEYPOINTS = ("no keypoints (a blank or featureless image): a local pipeline cannot search "
                "it; use --pipeline global or global+sv if the gallery has a global model")


def gallery_spaces(g: Gallery | Any) -> tuple[str | None, str | None]:
    """``(global space, local space)`` of a gallery or a :class:`GalleryState` (the
    primary global space, the local space with the most items); ``None`` where it has
    none."""
    state = g.state() if isinstance(g, Gallery) else g
    local = state.of_kind("local")
    loc = max(local, key=lambda s: s.count).space if local else None
    glob = state.primary
    sp = state.space(glob)
    if sp is None or sp.count == 0:
        glob = None
    return glob, loc


class PipelineSearcher(Searcher):
    """One named pipeline over a gallery's spaces (see the module docstring).

    Attributes:
        pipeline: its name; ``spaces``: the spaces whose query data it needs.
        params: the pipeline's options (``shortlist``, ``k``, ``blend`` ...).
    """

    kind = "pipeline"

    def __init__(self, gallery: Gallery, pipeline: str, *, global_space: str | None,
                 local_space: str | None, extractors: dict[str, Extractor] | None = None,
                 params: dict[str, Any] | None = None) -> None:
        if pipeline not in PIPELINES:
            raise InputError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
        self.gallery, self.pipeline = gallery, pipeline
        self.global_space, self.local_space = global_space, local_space
        self.params = dict(params or {})
        blend = bool(self.params.get("blend"))
        needs_global = pipeline in ("global", "global+sv", "hybrid") or blend
        needs_local = pipeline != "global"
        if needs_global and global_space is None:
            raise InputError(f"the {pipeline} pipeline{' with blend' if blend else ''} needs a "
                             f"global model in the gallery; {gallery.path} has only local "
                             "features (index it with --model too, or use --pipeline local)")
        if needs_local and local_space is None:
            raise InputError(f"the {pipeline} pipeline needs local features; {gallery.path} has "
                             "none (index it with --local sift)")
        self.spaces = [s for s, need in ((global_space, needs_global), (local_space, needs_local))
                       if need and s is not None]
        self.models = dict(extractors or {})
        self._lock = threading.Lock()
        self._single: tuple[int, Any] | None = None  # (generation, one merged local index)
        try:
            self.build(self.gallery.views(self.spaces))  # validates the parameters early
        except TypeError as exc:
            raise InputError(f"pipeline {pipeline!r}: bad parameters {sorted(self.params)}: "
                             f"{exc}") from exc

    # ------------------------------------------------------------- contract
    def embed_paths(self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 16,
                    workers: int = 2) -> tuple[Queries, list[int], list[QueryFailure]]:
        """Embed query files; a query without keypoints is a failure of a local pipeline."""
        q, good, fails = super().embed_paths(paths, batch_size=batch_size, workers=workers)
        if self.pipeline in ("local", "local+mds") and good:
            feats = q[self.local_space]  # type: ignore[index]
            blank = [n for n, f in enumerate(feats) if len(f) == 0]
            if blank:
                fails += [QueryFailure(str(paths[good[n]]), NO_KEYPOINTS) for n in blank]
                keep = [n for n in range(len(good)) if n not in set(blank)]
                q, good = q.take(keep), [good[n] for n in keep]
        return q, good, fails

    def _search(self, q: Queries, k: int, options: SearchOptions) -> SearchResult:
        """Top-``k`` string ids (``None`` padding) for ``Queries`` of :attr:`spaces`."""
        local = q[self.local_space] if self.local_space in self.spaces else None
        if local is not None:
            local = list(local)
            bad = [n for n, f in enumerate(local) if not isinstance(f, LocalFeatures)]
            if bad:
                raise InputError(f"queries {bad[:5]} of {self.local_space!r} are not "
                                 "LocalFeatures")
            blank = [n for n, f in enumerate(local) if len(f) == 0]
            if blank and self.pipeline in ("local", "local+mds"):
                raise InputError(f"queries {blank[:5]} have {NO_KEYPOINTS}")
        vecs = q[self.global_space] if self.global_space in self.spaces else None
        views = self.gallery.views(self.spaces)
        pipe, view = self.build(views)
        size = clamp_k(k, view.count)
        res = pipe.search(QueryBatch(vectors=vecs, local=local), size)
        return SearchResult(res.scores, view.ids.lookup(res.ids), view.generation)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        return {**d, "pipeline": self.pipeline, "model": self.global_space or self.local_space,
                "params": dict(self.params)}

    # -------------------------------------------------------------- parts
    def build(self, views: dict[str, SpaceView]) -> tuple[Any, SpaceView]:
        """The pipeline object over ``views`` -> ``(pipeline, the view whose ids it returns)``."""
        g, p = self.gallery, self.params
        gv = views.get(self.global_space) if self.global_space else None
        lv = views.get(self.local_space) if self.local_space else None
        if self.pipeline == "global":
            assert gv is not None
            return GlobalPipeline(gv), gv
        if self.pipeline == "global+sv":
            assert gv is not None and self.local_space is not None
            space = self.local_space
            return GlobalSVPipeline(gv, lambda keys: g.get_local(keys, space=space), **p), gv
        assert lv is not None
        index = self.local_index(lv)
        if self.pipeline == "local":
            return LocalPipeline(index), lv
        if self.pipeline == "hybrid":  # gallery keys; ids looked up in the global view
            assert gv is not None
            gspace, lspace = self.global_space, self.local_space
            return HybridPipeline(
                gv, index, lambda keys: g.get_vectors(keys, space=gspace),
                fetch_local=lambda keys: g.get_local(keys, space=lspace), **p), gv
        fetch = None
        if p.get("blend"):
            gspace = self.global_space
            fetch = lambda keys: g.get_vectors(keys, space=gspace)  # noqa: E731

        if not isinstance(index, AsmkIndex):
            raise InputError("local+mds needs image-to-image similarities from an ASMK index; "
                             f"the local space is indexed by {type(index).__name__}")
        return LocalMDSPipeline(index, fetch_vectors=fetch, **p), lv

    def local_index(self, view: SpaceView) -> Any:
        """One index of everything in ``view`` (base + delta folded, on a copy)."""
        if view.delta is None and not len(view.removed):
            return view.base
        with self._lock:
            if self._single is not None and self._single[0] == view.generation:
                return self._single[1]

            idx = merge_view(view, force=True).base
            self._single = (view.generation, idx)
            return idx


def open_pipeline(gallery: str | os.PathLike[str] | Gallery, name: str, *,
                  runtime: str = "auto", threads: int | None = None, with_models: bool = True,
                  **params: Any) -> PipelineSearcher:
    """A :class:`PipelineSearcher` for pipeline ``name`` (no decision: see
    :func:`galleria.open_searcher` for the gallery's default).

    ``params`` go to the pipeline (``shortlist``, ``matcher``, ``k``, ``candidates``,
    ``p``, ``dim``, ``blend`` ...). Query models are rebuilt from the spaces' records
    (``with_models=False``: search with query data only).
    """
    g = gallery if isinstance(gallery, Gallery) else Gallery.open(gallery)
    glob, loc = gallery_spaces(g)
    exts: dict[str, Extractor] = {}
    s = PipelineSearcher(g, name, global_space=glob, local_space=loc, params=params)
    if with_models:
        for space in s.spaces:
            exts[space] = extractor_from_space(g.space_info(space).info, root=g.path,
                                               runtime=runtime, threads=threads, query=True)
        s.models = exts
    log.info("pipeline %s over %s", name, s.spaces)
    return s
