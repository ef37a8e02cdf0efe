"""The local-feature index contract (ASMK, CANN), shared bookkeeping and helpers.

A :class:`LocalIndex` follows :class:`galleria.index.base.Index` with
``list[LocalFeatures]`` in place of ``(N, D)`` vectors:

- ``train(features)`` learns what the index needs (codebook, coarse
  quantizer); ``add`` trains from its first batch when the index is untrained.
- ``add(keys, features)`` / ``remove(keys)``: incremental, int64 keys.
- ``search(queries, k) -> SearchResult``: ``(Q, k)`` int64 keys, ``-1`` /
  ``-inf`` padding; a query without keypoints gets an all-missing row (and a
  log line), never an exception. Searching never mutates the index, so any
  number of threads may search one index at once.
- ``similarities(query, keys) -> (n,)`` and, where the index can afford it,
  ``pairwise(keys) -> (n, n)`` (image-to-image): the local similarities MDS
  re-ranking embeds (:mod:`galleria.rerank.mds`).
- ``save(dir)`` / ``load(dir, fingerprint=, dim=)`` with the header checks of
  :class:`~galleria.index.base.Index` (type, format version, params,
  fingerprint, dim); ``copy()`` gives an independent index; ``nbytes()`` the
  bytes the index holds in memory.

Internally each image gets a *row* (assigned in insertion order, never
reused until a compaction); :class:`Rows` maps keys to rows.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.index.base import Index, as_keys, check_k
from galleria.local.features import check_features
from galleria.types import LocalFeatures, SearchResult

log = logging.getLogger(__name__)


class Rows:
    """Key <-> row bookkeeping: ``row_key[row]`` is the key or -1 (removed)."""

    def __init__(self, row_key: np.ndarray | None = None) -> None:
        self.row_key = (np.zeros(0, np.int64) if row_key is None
                        else np.ascontiguousarray(row_key, np.int64))
        self.key_row = {int(k): r for r, k in enumerate(self.row_key.tolist()) if k >= 0}

    def __len__(self) -> int:
        return len(self.key_row)

    @property
    def capacity(self) -> int:
        return int(self.row_key.shape[0])

    def copy(self) -> Rows:
        out = Rows.__new__(Rows)
        out.row_key = self.row_key.copy()
        out.key_row = dict(self.key_row)
        return out

    def check_new(self, keys: np.ndarray) -> None:
        dup = [int(k) for k in keys.tolist() if int(k) in self.key_row]
        if dup:
            more = " ..." if len(dup) > 5 else ""
            raise InputError(f"keys already in the index: {dup[:5]}{more}")

    def append(self, keys: np.ndarray) -> np.ndarray:
        """Assign fresh rows to new keys -> their ``(n,)`` int64 rows."""
        start = self.capacity
        rows = np.arange(start, start + keys.size, dtype=np.int64)
        self.row_key = np.concatenate([self.row_key, keys.astype(np.int64)])
        for k, r in zip(keys.tolist(), rows.tolist(), strict=True):
            self.key_row[int(k)] = r
        return rows

    def pop(self, keys: np.ndarray) -> np.ndarray:
        """Mark the known keys removed -> their rows (unknown keys are ignored)."""
        rows = [self.key_row.pop(int(k)) for k in keys.tolist() if int(k) in self.key_row]
        r = np.array(rows, np.int64)
        self.row_key[r] = -1
        return r

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Rows of keys that must all be present (InputError naming the missing ones)."""
        out = np.empty(keys.size, np.int64)
        missing = []
        for i, k in enumerate(keys.tolist()):
            r = self.key_row.get(int(k))
            if r is None:
                missing.append(int(k))
            else:
                out[i] = r
        if missing:
            raise InputError(f"keys not in the index: {missing[:5]}")
        return out

    def keys(self) -> np.ndarray:
        k = self.row_key
        return k[k >= 0].copy()

    def alive(self) -> np.ndarray:
        return self.row_key >= 0


def topk_rows(scores: np.ndarray, row_key: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` live rows of one ``(R,)`` score vector -> ``(scores (k,), keys (k,))``.

    Removed rows (``row_key < 0``) never appear; ties go to the lower row
    (insertion order); fewer than ``k`` live rows pad with ``-inf`` / ``-1``.
    """
    s = np.where(row_key >= 0, scores, -np.inf).astype(np.float32, copy=False)
    n = s.shape[0]
    out_s = np.full(k, -np.inf, np.float32)
    out_k = np.full(k, -1, np.int64)
    if n == 0:
        return out_s, out_k
    kk = min(k, n)
    if kk < n:
        part = np.argpartition(-s, kk - 1)[:kk]
        thr = s[part].min()
        cand = np.flatnonzero(s >= thr)  # ties at the threshold: keep all, sort below
    else:
        cand = np.arange(n)
    order = cand[np.lexsort((cand, -s[cand]))][:kk]
    valid = np.isfinite(s[order])
    order = order[valid]
    out_s[: order.size] = s[order]
    out_k[: order.size] = row_key[order]
    return out_s, out_k


class LocalIndex(Index):
    """Abstract local-feature index (see the module docstring for the contract)."""

    def __init__(self, dim: int, *, fingerprint: str | None = None) -> None:
        super().__init__(dim, fingerprint=fingerprint)
        self._rows = Rows()

    # -- contract ---------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def is_trained(self) -> bool: ...

    @abc.abstractmethod
    def train(self, features: Sequence[LocalFeatures]) -> LocalIndex:
        """Learn the codebook / quantizer from gallery features; returns self."""

    @abc.abstractmethod
    def _add_rows(self, rows: np.ndarray, features: list[LocalFeatures]) -> None: ...

    @abc.abstractmethod
    def _remove_rows(self, rows: np.ndarray) -> None: ...

    @abc.abstractmethod
    def score_rows(self, query: LocalFeatures) -> np.ndarray:
        """``(R,)`` float32 similarity of one query to every row (removed rows: any value)."""

    @abc.abstractmethod
    def copy(self) -> LocalIndex:
        """An independent index with the same content (searches on it never see later
        changes to this one)."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held in memory by the index structures (codebook included)."""

    def pairwise(self, keys: np.ndarray) -> np.ndarray:
        """``(n, n)`` image-to-image similarities among ``keys`` (diagonal 1)."""
        raise NotImplementedError(f"{type(self).__name__} does not compute image-to-image "
                                  "similarities; use an ASMK index for them")

    # -- shared public methods ----------------------------------------------------------
    def add(self, keys: np.ndarray, features: Sequence[LocalFeatures]) -> None:  # type: ignore[override]
        """Add images: ``(N,)`` new int64 keys and one LocalFeatures each (n may be 0)."""
        feats = check_features(features, dim=self.dim)
        k = as_keys(keys, n=len(feats))
        self._rows.check_new(k)
        if k.size == 0:
            return
        if not self.is_trained:
            log.info("%s: training on the first batch (%d images)", self.type_name, k.size)
            self.train(feats)
        rows = self._rows.append(k)
        try:
            self._add_rows(rows, feats)
        except BaseException:
            self._rows.pop(k)
            raise

    def remove(self, keys: np.ndarray) -> int:
        k = as_keys(keys, unique=False)
        rows = self._rows.pop(np.unique(k))
        if rows.size:
            self._remove_rows(rows)
        return int(rows.size)

    def search(self, queries: Sequence[LocalFeatures], k: int) -> SearchResult:  # type: ignore[override]
        """Top-``k`` images for each query image's local features -> ``(Q, k)``."""
        return self.search_with_similarities(queries, k, np.zeros(0, np.int64))[0]

    def search_with_similarities(self, queries: Sequence[LocalFeatures], k: int,
                                 keys: np.ndarray) -> tuple[SearchResult, np.ndarray]:
        """:meth:`search` and :meth:`similarities` to ``keys`` (all present) of every
        query from one scoring of each -> ``((Q, k) result, (Q, n) float32)``; the
        same values as the two calls (a query is encoded once, not twice)."""
        k = check_k(k)
        qs = check_features(queries, dim=self.dim, name="queries")
        if not qs:
            raise InputError("queries is empty (no query images)")
        rows = self._rows.rows_of(as_keys(keys, unique=False))
        out = SearchResult.empty(len(qs), k)
        sims = np.zeros((len(qs), rows.size), np.float32)
        for i, q in enumerate(qs):
            if len(q) == 0:
                log.warning("query %d has no keypoints: no local result", i)
                continue
            if len(self) == 0:
                continue
            scores = self.score_rows(q)
            out.scores[i], out.ids[i] = topk_rows(scores, self._rows.row_key, k)
            sims[i] = scores[rows]
        return out, sims

    def similarities(self, query: LocalFeatures, keys: np.ndarray) -> np.ndarray:
        """``(n,)`` float32 similarity of one query to the images ``keys`` (all present)."""
        check_features([query], dim=self.dim, name="query")
        rows = self._rows.rows_of(as_keys(keys, unique=False))
        if len(query) == 0 or rows.size == 0:
            return np.zeros(rows.size, np.float32)
        return self.score_rows(query)[rows].astype(np.float32)

    def keys(self) -> np.ndarray:
        return self._rows.keys()

    def __len__(self) -> int:
        return len(self._rows)

    def _base_params(self) -> dict[str, Any]:
        return {}
