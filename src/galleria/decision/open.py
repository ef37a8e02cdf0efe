"""Open the searcher :func:`~galleria.decision.choose.choose` decided on.

:func:`open_searcher` is the one public entry (``galleria.open_searcher``): it
reads the gallery's state once, asks :func:`choose` and builds that searcher.
:func:`build` builds a searcher from a spec alone (the service keeps one per spec).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from galleria.decision.choose import SearchRequest, SearchSpec, choose
from galleria.errors import InputError
from galleria.search.contract import Searcher
from galleria.search.gallery_pipeline import open_pipeline
from galleria.search.searcher import PlainSearcher
from galleria.store.gallery import Gallery
from galleria.upgrade.search import BackfillSearcher

log = logging.getLogger(__name__)


class Shards(Protocol):
    """What opens sharded searchers (``galleria.service.sharded.ShardPool``)."""

    def open(self, gallery: Gallery, *, runtime: str, threads: int | None) -> Searcher: ...


def build(gallery: Gallery, spec: SearchSpec, *, runtime: str = "auto",
          threads: int | None = None, with_models: bool = True,
          shards: Shards | None = None) -> Searcher:
    """The searcher ``spec`` names, over ``gallery`` (query models rebuilt from the
    spaces' records unless ``with_models`` is false)."""
    s: Searcher
    if spec.kind == "plain":
        s = PlainSearcher.open(gallery, space=spec.space, runtime=runtime, threads=threads,
                               with_model=with_models)
    elif spec.kind == "backfill":
        s = BackfillSearcher.open(gallery, rule=spec.rule, runtime=runtime, threads=threads,
                                  with_models=with_models)
    elif spec.kind == "pipeline":
        s = open_pipeline(gallery, spec.pipeline, runtime=runtime, threads=threads,
                          with_models=with_models, **dict(spec.params))
    elif spec.kind == "sharded":
        if shards is None:
            raise InputError("sharded search needs a Ray pool (galleria serve --ray)")
        s = shards.open(gallery, runtime=runtime, threads=threads)
    else:
        raise InputError(f"unknown searcher kind {spec.kind!r}")
    s.spec = spec
    log.info("searching %s with %s (%s)", gallery.path, spec.kind, spec.reason)
    return s


def open_searcher(gallery: str | os.PathLike[str] | Gallery,
                  request: SearchRequest | None = None, *, runtime: str = "auto",
                  threads: int | None = None, with_models: bool = True,
                  pipeline: str | None = None, space: str | None = None, rule: str = "auto",
                  **params: Any) -> Searcher:
    """The searcher a gallery calls for (the one entry of the CLI, the Python API and
    the service).

    Args:
        gallery: a gallery folder or an open :class:`~galleria.store.gallery.Gallery`.
        request: a :class:`SearchRequest`; or give its fields as keywords:
        pipeline: ``global`` | ``global+sv`` | ``local`` | ``local+mds`` (``None``: the
            gallery's default: its tuned choice, else by its spaces).
        space: plain search of this space (no decision).
        rule: the merge rule while an upgrade is in progress.
        params: pipeline parameters (``shortlist``, ``k``, ``blend``...).
        runtime, threads: how the query models run.
        with_models: build the query models (``False``: search with vectors only).

    Returns:
        A :class:`~galleria.search.contract.Searcher`: ``embed_paths`` /
        ``embed_images`` / ``search(queries, k, options)`` / ``describe()``.
    """
    g = gallery if isinstance(gallery, Gallery) else Gallery.open(gallery)
    req = request or SearchRequest.of(pipeline, space=space, rule=rule, **params)
    return build(g, choose(g.state(), req), runtime=runtime, threads=threads,
                 with_models=with_models)
