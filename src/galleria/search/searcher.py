"""Plain search over one global space of a gallery (also a fused gallery, searched
with its light query model).

:class:`PlainSearcher` is one kind of :class:`~galleria.search.contract.Searcher`;
which kind answers a gallery is decided by :func:`galleria.decision.choose` (an
upgrade in progress, local features, the tuned default...), so the CLI, the
Python API and the service never decide.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, InputError
from galleria.extract.queries import Queries
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.search.contract import Searcher, SearchOptions
from galleria.store.gallery import Gallery
from galleria.types import MISSING_KEY, SearchResult
from galleria.validate import as_embeddings, l2_normalize


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


class PlainSearcher(Searcher):
    """Search over one global space (plain, or fused with a light query model).

    The query model is rebuilt from the space's record (its ``query_config`` when
    the space is asymmetric, e.g. a fused gallery), fingerprint checked. A
    long-lived searcher sees new commits on its next search. Options: ``qe``,
    ``qe_alpha``, ``dim``, ``funnel``, ``where`` (a payload filter).
    """

    kind = "plain"
    supports = frozenset({"qe", "qe_alpha", "dim", "funnel", "where"})

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
        self.spaces = [self.space]
        self.models = {self.space: extractor} if extractor is not None else {}

    @classmethod
    def open(cls, path: str | os.PathLike[str] | Gallery, *, space: str | None = None,
             runtime: str = "auto", threads: int | None = None,
             with_model: bool = True) -> PlainSearcher:
        """Plain search of ``space`` (default: the primary space), with no decision: an
        upgrade in progress is NOT taken into account. To search a gallery as every
        entry does, use :func:`galleria.open_searcher`."""
        g = path if isinstance(path, Gallery) else Gallery.open(path)
        info = g.space_info(space)
        ext = (extractor_from_space(info.info, root=g.path, runtime=runtime, threads=threads,
                                    query=True) if with_model else None)
        return cls(g, ext, space=info.space)

    @property
    def extractor(self) -> Extractor | None:
        """The query model (``None`` when opened without one)."""
        return self.models.get(self.space)

    def _search(self, queries: Queries, k: int, options: SearchOptions) -> SearchResult:
        x = as_embeddings(queries[self.space], name="queries")
        qe = options.qe
        kw = {"fingerprint": self.space, "dim": options.dim, "funnel": options.funnel,
              "where": options.where}
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
            x = expand_with_neighbours(x, nb, sc, alpha=options.qe_alpha)
            res = self.gallery.search(x, k, **kw)
        return res.head(k)

    def search_vectors(self, queries: np.ndarray, k: int = 10, **kw: Any) -> SearchResult:
        """``(Q, D)`` query vectors of this space's model -> top-k with string ids."""
        return self.search(queries, k, **kw)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        return {**d, "pipeline": d["pipeline"] or "global"}
