"""Adaptive-size search over nested embeddings ((SS)2D, Matryoshka, PCA).

Vectors of a nested transform keep their most useful coordinates first, so the
first ``d`` coordinates, re-normalised, are a ``d``-dimensional embedding. A
:class:`PrefixIndex` stores the full ``D``-dimensional vectors once and searches

- at any prefix size ``d`` without re-indexing (``search(q, k, dim=d)``), and
- by funnel (``funnel_search``): shortlist ``S`` candidates with a small prefix,
  re-score them with a larger one (default: the full vectors).

Both are exact at their stage (the :func:`~galleria.index.exact.inner_product_topk`
kernel); re-normalised prefixes of the gallery are computed once per size and
cached until the index changes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.index.base import HEADER_NAME, check_k, pad_result
from galleria.index.exact import ExactIndex, inner_product_topk
from galleria.io.atomic import read_json
from galleria.types import SearchResult
from galleria.validate import l2_normalize


def prefix(x: np.ndarray, dim: int) -> np.ndarray:
    """First ``dim`` coordinates of ``(N, D)`` rows, re-normalised, C-contiguous."""
    return l2_normalize(np.ascontiguousarray(x[:, :dim], dtype=np.float32))


_RESCORE_CHUNK_BYTES = 8 << 20


def funnel_rescore(
    queries: np.ndarray,
    vectors: np.ndarray,
    candidates: np.ndarray,
    k: int,
    *,
    dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score ``(Q, S)`` candidate rows of ``vectors`` with the queries at prefix ``dim``.

    Args:
        queries: ``(Q, D)`` full queries (re-normalised at ``dim`` here).
        vectors: ``(N, D)`` gallery rows (normalised at ``D``).
        candidates: ``(Q, S)`` row numbers (``-1`` = none).
        k: results to keep per query.

    Returns:
        ``(scores (Q, k'), rows (Q, k'))`` best first, ``k' = min(k, S)``.
    """
    d = vectors.shape[1] if dim is None else int(dim)
    q = prefix(queries, d)
    safe = np.maximum(candidates, 0)
    nq, ns = candidates.shape
    scores = np.empty((nq, ns), np.float32)
    # gather the candidates a few queries at a time: one (Q, S, D) gather of 1000 x 200
    # x 512 floats is 400 MB of fresh pages; 8 MB chunks stay in cache (0.4-0.9 -> 0.06 s)
    step = max(1, _RESCORE_CHUNK_BYTES // max(1, ns * vectors.shape[1] * 4))
    for q0 in range(0, nq, step):
        q1 = min(nq, q0 + step)
        cand = vectors[safe[q0:q1]]  # (c, S, D)
        if d < vectors.shape[1]:
            cand = cand[:, :, :d]
        sc = np.matmul(cand, q[q0:q1, :, None])[:, :, 0]
        if d < vectors.shape[1]:
            sc /= np.maximum(np.linalg.norm(cand, axis=2), 1e-12)
        scores[q0:q1] = sc
    scores[candidates < 0] = -np.inf
    kk = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(scores, top, 1), np.take_along_axis(candidates, top, 1)


class PrefixIndex(ExactIndex):
    """Exact index over nested vectors, searchable at any prefix size or by funnel.

    Args:
        dim: full vector dimension ``D`` (the largest nested size).
        shortlist_dim: default prefix of the funnel's first stage.
        shortlist: default number of candidates the funnel re-scores.
    """

    type_name = "prefix"

    def __init__(
        self,
        dim: int,
        *,
        fingerprint: str | None = None,
        shortlist_dim: int = 32,
        shortlist: int = 200,
        **kw: Any,
    ) -> None:
        super().__init__(dim, fingerprint=fingerprint, **kw)
        if not 1 <= shortlist_dim <= dim:
            raise InputError(f"shortlist_dim must be in [1, {dim}], got {shortlist_dim}")
        if shortlist < 1:
            raise InputError(f"shortlist must be >= 1, got {shortlist}")
        self.shortlist_dim = int(shortlist_dim)
        self.shortlist = int(shortlist)
        self._prefix_cache: dict[int, np.ndarray] = {}
        self._cache_lock = threading.Lock()  # concurrent searches fill the cache once

    def params(self) -> dict[str, Any]:
        return {**super().params(), "shortlist_dim": self.shortlist_dim,
                "shortlist": self.shortlist}

    def copy(self) -> PrefixIndex:
        out = super().copy()
        assert isinstance(out, PrefixIndex)
        with self._cache_lock:  # cached prefixes are read-only arrays: shared
            out._prefix_cache = dict(self._prefix_cache)
        out._cache_lock = threading.Lock()
        return out

    # mutations invalidate the cached prefixes
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        super().add(keys, vectors)
        self._prefix_cache.clear()

    def remove(self, keys: np.ndarray) -> int:
        n = super().remove(keys)
        if n:
            self._prefix_cache.clear()
        return n

    def _check_dim(self, dim: int | None) -> int:
        d = self.dim if dim is None else int(dim)
        if not 1 <= d <= self.dim:
            raise InputError(f"prefix size must be in [1, {self.dim}], got {dim}")
        return d

    def _gallery_prefix(self, d: int) -> np.ndarray:
        if d == self.dim:
            return self._table.vectors
        cached = self._prefix_cache.get(d)
        if cached is None:
            with self._cache_lock:
                cached = self._prefix_cache.get(d)
                if cached is None:
                    cached = prefix(self._table.vectors, d)
                    cached.flags.writeable = False
                    self._prefix_cache[d] = cached
        return cached

    def search(self, queries: np.ndarray, k: int, *, dim: int | None = None) -> SearchResult:
        """Top-``k`` by cosine of the first ``dim`` coordinates (default: all)."""
        k = check_k(k)
        q = self._queries(queries)
        d = self._check_dim(dim)
        if len(self._table) == 0:
            return SearchResult.empty(q.shape[0], k)
        qd = q if d == self.dim else prefix(q, d)
        scores, rows = inner_product_topk(qd, self._gallery_prefix(d), k,
                                          max_batch_bytes=self.max_batch_bytes)
        return pad_result(scores, self._table.keys[rows], k)

    def funnel_search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        shortlist_dim: int | None = None,
        shortlist: int | None = None,
        rescore_dim: int | None = None,
    ) -> SearchResult:
        """Shortlist with a ``shortlist_dim`` prefix, re-score at ``rescore_dim`` (default D)."""
        k = check_k(k)
        q = self._queries(queries)
        sd = self._check_dim(shortlist_dim or self.shortlist_dim)
        rd = self._check_dim(rescore_dim)
        s = max(k, int(shortlist or self.shortlist))
        if len(self._table) == 0:
            return SearchResult.empty(q.shape[0], k)
        _, cand = inner_product_topk(prefix(q, sd), self._gallery_prefix(sd), s,
                                     max_batch_bytes=self.max_batch_bytes)
        scores, rows = funnel_rescore(q, self._table.vectors, cand, k, dim=rd)
        return pad_result(scores, self._table.keys[rows], k)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, fingerprint: str | None = None,
        dim: int | None = None,
    ) -> PrefixIndex:

        index = super().load(path, fingerprint=fingerprint, dim=dim)
        assert isinstance(index, PrefixIndex)
        params = read_json(Path(path) / HEADER_NAME)["params"]
        index.shortlist_dim = int(params.get("shortlist_dim", index.shortlist_dim))
        index.shortlist = int(params.get("shortlist", index.shortlist))
        return index
