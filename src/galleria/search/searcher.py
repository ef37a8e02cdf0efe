"""The one searcher contract, and plain search over one space.

Every searcher (plain, fused-asymmetric, backfill, local pipelines, sharded)
implements::

    queries, positions, failures = searcher.embed_paths(paths)   # or embed_images(images)
    result = searcher.search(queries, k)                          # SearchResult, string ids

where ``queries`` is a :class:`Queries`: the query data per space fingerprint
(``(Q, D)`` vectors, or ``list[LocalFeatures]`` for a local space).
:func:`open_searcher` asks the gallery which searcher fits (an upgrade in
progress, a local or fused space...), so the CLI and the service never decide.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from galleria.errors import CompatibilityError, InputError
from galleria.extract.queries import Queries, QueryFailure, embed_with, search_paths
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.store.gallery import Gallery
from galleria.types import MISSING_KEY, SearchResult
from galleria.validate import as_embeddings, l2_normalize


class SearcherLike(Protocol):
    """What every searcher offers (see the module docstring)."""

    gallery: Gallery

    def embed_images(self, images: Sequence[Image.Image]) -> Queries: ...

    def embed_paths(self, paths: Sequence[str | os.PathLike[str]]
                    ) -> tuple[Queries, list[int], list[QueryFailure]]: ...

    def search(self, queries: Any, k: int = 10, **options: Any) -> SearchResult: ...


def expand_with_neighbours(
    queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, *, alpha: float
) -> np.ndarray:
    """alpha-QE from search results: ``q' = norm(q + sum_i max(s_i, 0)^alpha x_i)``.

    Args:
        queries: ``(Q, D)`` query vectors.
        neighbours: ``(Q, k, D)`` vectors of each query's top-k results.
        scores: ``(Q, k)`` their similarities (``-inf`` rows for missing results).
    """
    w = np.where(np.isfinite(scores), np.maximum(scores, 0.0), 0.0) ** alpha
    return l2_normalize(queries + np.einsum("qk,qkd->qd", w, neighbours).astype(np.float32))


class Searcher:
    """Search over one global space of a gallery (plain, or fused with a light query model).

    The query model is rebuilt from the space's record (its ``query_config`` when
    the space is asymmetric, e.g. a fused gallery), fingerprint checked. A
    long-lived searcher sees new commits on its next search.
    """

    def __init__(self, gallery: Gallery, extractor: Extractor | None = None, *,
                 space: str | None = None) -> None:
        self.gallery = gallery
        self.space = space or gallery.primary_space
        if self.space is None:
            raise InputError(f"gallery {gallery.path} is empty")
        if extractor is not None and extractor.fingerprint != self.space:
            raise CompatibilityError(
                f"query model {extractor.fingerprint!r} does not match the gallery space "
                f"{self.space!r}")
        self.extractor = extractor

    @classmethod
    def open(cls, path: str | os.PathLike[str] | Gallery, *, space: str | None = None,
             runtime: str = "auto", threads: int | None = None,
             with_model: bool = True) -> Searcher:
        g = path if isinstance(path, Gallery) else Gallery.open(path)
        info = g.space_info(space)
        ext = (extractor_from_space(info.info, root=g.path, runtime=runtime, threads=threads,
                                    query=True) if with_model else None)
        return cls(g, ext, space=info.space)

    # ------------------------------------------------------------- contract
    def embed_images(self, images: Sequence[Image.Image]) -> Queries:
        return Queries({self.space: self._model().embed_images(list(images))})  # type: ignore[dict-item]

    def embed_paths(self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 16,
                    workers: int = 2) -> tuple[Queries, list[int], list[QueryFailure]]:
        return embed_with({self.space: self._model()}, paths, batch_size=batch_size,  # type: ignore[dict-item]
                          workers=workers)

    def search(self, queries: Any, k: int = 10, *, qe: int = 0, qe_alpha: float = 3.0,
               dim: int | None = None, funnel: tuple[int, int] | None = None) -> SearchResult:
        """Top-``k`` string ids for ``queries`` (``Queries``, ``{space: (Q, D)}`` or ``(Q, D)``).

        ``qe``: alpha query expansion over the top ``qe`` results; ``dim`` /
        ``funnel``: adaptive-size search (see :meth:`Gallery.search`).
        """
        q = Queries.of(queries, self.space)
        if self.space not in q:
            raise CompatibilityError(f"no queries for space {self.space!r}; got {list(q.data)}")
        x = as_embeddings(q[self.space], name="queries")
        kw = {"fingerprint": self.space, "dim": dim, "funnel": funnel}
        res = self.gallery.search(x, max(k, qe), **kw)
        if qe > 0:
            top = res.ids[:, :qe]
            keys = self.gallery.keys_of([i if i is not None else "" for i in top.reshape(-1)])
            keys = keys.reshape(top.shape)
            valid = keys != MISSING_KEY
            nb = np.zeros((*top.shape, x.shape[1]), np.float32)
            if valid.any():
                nb[valid] = self.gallery.get_vectors(keys[valid], space=self.space)
            sc = np.where(valid, res.scores[:, :qe], -np.inf).astype(np.float32)
            x = expand_with_neighbours(x, nb, sc, alpha=qe_alpha)
            res = self.gallery.search(x, k, **kw)
        return res.head(k)

    # ----------------------------------------------------------- convenience
    def search_vectors(self, queries: np.ndarray, k: int = 10, **kw: Any) -> SearchResult:
        """``(Q, D)`` query vectors of this space's model -> top-k with string ids."""
        return self.search(queries, k, **kw)

    def search_paths(self, paths: Sequence[str | os.PathLike[str]], k: int = 10, **kw: Any
                     ) -> tuple[list[str], SearchResult | None, list[QueryFailure]]:
        """Search with image files -> (paths of usable queries, result rows, failures)."""
        return search_paths(self, paths, k, **kw)

    def _model(self) -> Extractor:
        if self.extractor is None:
            raise InputError("this searcher was opened without a query model; search vectors")
        return self.extractor


def open_searcher(path: str | os.PathLike[str] | Gallery, *, space: str | None = None,
                  pipeline: str | None = None, rule: str = "auto", runtime: str = "auto",
                  threads: int | None = None) -> Any:
    """The searcher the gallery calls for: backfill during an upgrade, else plain.

    ``space`` forces plain search of that space; ``pipeline`` (``global``,
    ``local``, ``global+sv``, ``local+mds``) chooses a local-feature pipeline when
    the gallery holds local features.
    """
    g = path if isinstance(path, Gallery) else Gallery.open(path)
    if space is None and pipeline in (None, "global"):
        from galleria.upgrade.state import active_upgrade

        if active_upgrade(g) is not None:
            from galleria.upgrade.search import BackfillSearcher

            return BackfillSearcher.open(g, rule=rule, runtime=runtime, threads=threads)
    if pipeline not in (None, "global"):
        from galleria.search.pipelines import open_pipeline

        return open_pipeline(g, pipeline, runtime=runtime, threads=threads)
    return Searcher.open(g, space=space, runtime=runtime, threads=threads)
