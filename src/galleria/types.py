"""The one result type every index, search path and re-ranker returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from galleria.errors import InputError

MISSING_KEY = -1


@dataclass(frozen=True)
class SearchResult:
    """Top-k results of a batch of queries, best first, like ``faiss.Index.search``.

    Attributes:
        scores: ``(Q, K)`` float32 similarities (higher is better); ``-inf`` where
            fewer than K results exist.
        ids: ``(Q, K)`` item ids. From an :class:`~galleria.index.base.Index`
            these are int64 keys with ``-1`` for a missing result; from a
            :class:`~galleria.store.gallery.Gallery` they are the string ids of
            the items (object array) with ``None`` for a missing result.

    ``scores, ids = result`` unpacks like a faiss search.
    """

    scores: np.ndarray
    ids: np.ndarray
    generation: int | dict[str, int] | None = None
    """The committed store generation the result was computed at (per space when a
    search spans several spaces, e.g. during a backfill); ``None`` when unknown."""

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or self.scores.shape != self.ids.shape:
            raise InputError(
                f"SearchResult needs scores and ids of one (Q, K) shape, got "
                f"{self.scores.shape} and {self.ids.shape}"
            )

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.scores
        yield self.ids

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def k(self) -> int:
        return int(self.scores.shape[1])

    def head(self, k: int) -> SearchResult:
        """The first ``k`` columns."""
        return SearchResult(self.scores[:, :k], self.ids[:, :k], self.generation)

    def pad(self, k: int) -> SearchResult:
        """Exactly ``k`` columns: the first ``k``, or padded with ``-inf`` and missing
        ids (``-1`` for int64 keys, ``None`` for string ids)."""
        if self.k >= k:
            return self.head(k) if self.k > k else self
        out = SearchResult.empty(len(self), k, object_ids=self.ids.dtype == object)
        out.scores[:, : self.k], out.ids[:, : self.k] = self.scores, self.ids
        return SearchResult(out.scores, out.ids, self.generation)

    def row(self, q: int) -> list[tuple[object, float]]:
        """Results of query ``q`` as ``[(id, score), ...]`` without missing entries."""
        out = []
        for i, s in zip(self.ids[q], self.scores[q], strict=True):
            if i is None or (isinstance(i, (int, np.integer)) and i == MISSING_KEY):
                continue
            out.append((i.item() if isinstance(i, np.generic) else i, float(s)))
        return out

    @staticmethod
    def empty(q: int, k: int, *, object_ids: bool = False) -> SearchResult:
        scores = np.full((q, k), -np.inf, dtype=np.float32)
        if object_ids:
            ids = np.full((q, k), None, dtype=object)
        else:
            ids = np.full((q, k), MISSING_KEY, dtype=np.int64)
        return SearchResult(scores, ids)


def missing_mask(ids: np.ndarray) -> np.ndarray:
    """``ids.shape`` bool: where a result is missing (``None`` string id or key ``-1``)."""
    if ids.dtype == object:
        return np.array([i is None for i in ids.reshape(-1)], dtype=bool).reshape(ids.shape)
    return ids == MISSING_KEY


def merge_top(parts: Sequence[SearchResult], k: int, *, unique: bool = False) -> SearchResult:
    """One top-``k`` list per query from per-part results of the same queries, best first.

    Args:
        parts: ``(Q, K_i)`` results of the same ``Q`` queries (string ids or int64 keys,
            all of one kind); their scores must be comparable (map them first).
        k: length of the merged lists (padded with ``-inf`` and missing ids).
        unique: an id present in several parts is kept once, at its best score
            (otherwise the parts are taken to hold disjoint items).

    Ties keep part order, then rank: the merge is deterministic.
    """
    if not parts:
        raise InputError("merging needs at least one result")
    q = len(parts[0])
    if any(len(p) != q for p in parts):
        raise InputError(f"parts have different numbers of queries: {[len(p) for p in parts]}")
    object_ids = parts[0].ids.dtype == object
    if any((p.ids.dtype == object) != object_ids for p in parts):
        raise InputError("cannot merge string-id results with int-key results")
    if len(parts) == 1 and not unique:
        return parts[0].pad(k)
    scores = np.concatenate([np.where(missing_mask(p.ids), -np.inf, p.scores) for p in parts],
                            axis=1).astype(np.float32)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    if not unique:
        kk = min(k, scores.shape[1])
        top = order[:, :kk]
        return SearchResult(np.ascontiguousarray(np.take_along_axis(scores, top, 1)),
                            np.ascontiguousarray(np.take_along_axis(ids, top, 1))).pad(k)
    out = SearchResult.empty(q, k, object_ids=object_ids)
    for r in range(q):
        seen: set[object] = set()
        n = 0
        for j in order[r]:
            s = scores[r, j]
            if n >= k or s == -np.inf:
                break
            i = ids[r, j]
            key = i.item() if isinstance(i, np.generic) else i
            if key in seen:
                continue
            seen.add(key)
            out.scores[r, n], out.ids[r, n] = s, i
            n += 1
    return out


def clamp_k(k: int, n: int) -> int:
    """The number of result columns for ``k`` asked over ``n`` items: ``min(k, n)``, at
    least 1 (a search of an empty set still answers one missing column)."""
    return max(1, min(int(k), int(n)))


@dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image (what a ``local`` extractor returns per image).

    Attributes:
        keypoints: ``(n, 4)`` float32 rows ``(x, y, scale, score)`` in pixels of the
            image as decoded (before any resizing the extractor does internally).
        descriptors: ``(n, d)`` float32 (L2-normalised rows) or uint8.
        image_size: ``(width, height)`` of that image.

    ``n`` may be 0 (a blank image has no keypoints).
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        kp, de = self.keypoints, self.descriptors
        if kp.ndim != 2 or kp.shape[1] != 4:
            raise InputError(f"keypoints must have shape (n, 4); got {kp.shape}")
        if de.ndim != 2 or de.shape[0] != kp.shape[0]:
            raise InputError(
                f"descriptors must have shape (n, d) with n = {kp.shape[0]}; got {de.shape}"
            )

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])
