"""The one result type every index, search path and re-ranker returns."""

from __future__ import annotations

from collections.abc import Iterator
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
