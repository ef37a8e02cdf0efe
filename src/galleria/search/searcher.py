"""Search a gallery with images: the query model is rebuilt from the gallery's record.

``Searcher.open(INDEX)`` reads which model made the gallery's primary space,
rebuilds that extractor (checking its fingerprint), embeds query images and
searches. Optional alpha query expansion re-queries with the weighted top
results.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from galleria.errors import CompatibilityError, InputError
from galleria.extract.embed import embed_items
from galleria.extract.job import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.images.sources import SourceItem
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


@dataclass
class QueryFailure:
    path: str
    reason: str


class Searcher:
    """Image search over one space of a gallery."""

    def __init__(self, gallery: Gallery, extractor: Extractor, *, space: str | None = None):
        self.gallery = gallery
        self.space = space or gallery.primary_space
        if self.space is None:
            raise InputError(f"gallery {gallery.path} is empty")
        if extractor.fingerprint != self.space:
            raise CompatibilityError(
                f"query model {extractor.fingerprint!r} does not match the gallery space "
                f"{self.space!r}"
            )
        self.extractor = extractor

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        space: str | None = None,
        runtime: str = "auto",
        threads: int | None = None,
    ) -> Searcher:
        g = Gallery.open(path)
        info = g.space_info(space)
        ext = extractor_from_space(info.info, root=g.path, runtime=runtime, threads=threads)
        return cls(g, ext, space=info.space)

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        qe: int = 0,
        qe_alpha: float = 3.0,
        dim: int | None = None,
        funnel: tuple[int, int] | None = None,
    ) -> SearchResult:
        """``(Q, D)`` query vectors -> top-k with string ids.

        ``qe``: alpha query expansion over the top ``qe`` results; ``dim`` /
        ``funnel``: adaptive-size search (see :meth:`Gallery.search`).
        """
        q = as_embeddings(queries, name="queries")
        kw = {"space": self.space, "fingerprint": self.space, "dim": dim, "funnel": funnel}
        res = self.gallery.search(q, max(k, qe), **kw)
        if qe > 0:
            top = res.ids[:, :qe]
            keys = self.gallery.keys_of([i if i is not None else "" for i in top.reshape(-1)])
            keys = keys.reshape(top.shape)
            valid = keys != MISSING_KEY
            nb = np.zeros((*top.shape, q.shape[1]), np.float32)
            if valid.any():
                nb[valid] = self.gallery.get_vectors(keys[valid], space=self.space)
            sc = np.where(valid, res.scores[:, :qe], -np.inf).astype(np.float32)
            q = expand_with_neighbours(q, nb, sc, alpha=qe_alpha)
            res = self.gallery.search(q, k, **kw)
        return res.head(k)

    def embed_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        batch_size: int = 16,
        workers: int = 2,
    ) -> tuple[np.ndarray, list[int], list[QueryFailure]]:
        """Embed query images -> ``(vectors of the good ones, their positions, failures)``."""
        items = [SourceItem(id=str(p), path=Path(p)) for p in paths]
        vecs, ok, fails = embed_items(items, self.extractor, batch_size=batch_size, workers=workers)
        good = [n for n, o in enumerate(ok) if o]
        return vecs[good], good, [QueryFailure(str(it.path), why) for it, why in fails]

    def search_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        k: int = 10,
        *,
        qe: int = 0,
        qe_alpha: float = 3.0,
        dim: int | None = None,
        funnel: tuple[int, int] | None = None,
    ) -> tuple[list[str], SearchResult | None, list[QueryFailure]]:
        """Search with image files -> (paths of usable queries, result rows for them, failures)."""
        vecs, good, fails = self.embed_paths(paths)
        if not good:
            return [], None, fails
        res = self.search_vectors(vecs, k, qe=qe, qe_alpha=qe_alpha, dim=dim, funnel=funnel)
        return [str(paths[n]) for n in good], res, fails
