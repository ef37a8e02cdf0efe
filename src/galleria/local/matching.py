"""Descriptor matching and spatial verification (pure functions on arrays).

- :func:`match_descriptors`: mutual nearest neighbours, Lowe's ratio test, or
  both, on L2-normalised float descriptors (cosine = inner product).
- :func:`homography_inliers`: OpenCV ``findHomography`` with
  ``cv2.USAC_MAGSAC`` on the matched keypoint positions; returns the inlier
  count (0 with fewer than 4 matches or no model).
- :func:`verify_pairs`: one query against several candidate images: inlier
  counts ``(n,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from galleria.errors import InputError
from galleria.local.features import float_descriptors
from galleria.types import LocalFeatures

MATCHERS = ("mutual", "ratio", "mutual+ratio")


def match_descriptors(
    a: np.ndarray, b: np.ndarray, *, method: str = "mutual", ratio: float = 0.8
) -> np.ndarray:
    """Matches between ``(n, d)`` and ``(m, d)`` float descriptors -> ``(k, 2)`` int64 pairs.

    ``mutual``: ``j`` is ``i``'s nearest neighbour and ``i`` is ``j``'s;
    ``ratio``: nearest distance < ``ratio`` x second nearest (L2 on unit vectors);
    ``mutual+ratio``: both.
    """
    if method not in MATCHERS:
        raise InputError(f"matcher must be one of {MATCHERS}; got {method!r}")
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        return np.zeros((0, 2), np.int64)
    s = a @ b.T  # (n, m) cosine
    nn = np.argmax(s, axis=1)
    keep = np.ones(n, bool)
    if "mutual" in method:
        keep &= np.argmax(s, axis=0)[nn] == np.arange(n)
    if "ratio" in method:
        if m < 2:
            keep[:] = False
        else:
            top2 = -np.partition(-s, 1, axis=1)[:, :2]  # best, second best cosine
            d = np.sqrt(np.maximum(2.0 - 2.0 * top2, 0.0))
            keep &= d[:, 0] < ratio * d[:, 1]
    i = np.flatnonzero(keep)
    return np.stack([i, nn[i]], axis=1).astype(np.int64)


def homography_inliers(
    src: np.ndarray, dst: np.ndarray, *, threshold: float = 6.0, max_iters: int = 2000,
    confidence: float = 0.999,
) -> int:
    """Inliers of the MAGSAC++ homography between ``(k, 2)`` point sets (0 if k < 4)."""
    import cv2  # lazy: cv2

    if src.shape[0] < 4:
        return 0
    _, mask = cv2.findHomography(np.ascontiguousarray(src, np.float32),
                                 np.ascontiguousarray(dst, np.float32), cv2.USAC_MAGSAC,
                                 float(threshold), maxIters=int(max_iters),
                                 confidence=float(confidence))
    return 0 if mask is None else int(mask.sum())


def verify_pairs(
    query: LocalFeatures, candidates: Sequence[LocalFeatures], *, method: str = "mutual",
    ratio: float = 0.8, threshold: float = 6.0, max_iters: int = 2000, min_matches: int = 4,
    matcher: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """``(n,)`` int32 MAGSAC homography inliers of ``query`` against each candidate.

    A pair with fewer than ``min_matches`` (at least 4) tentative matches is not verified
    (0 inliers). ``matcher``: ``(query (n, D), candidate (m, D)) -> (k, 2)`` matches in
    place of :func:`match_descriptors` with ``method`` / ``ratio``."""
    out = np.zeros(len(candidates), np.int32)
    if len(query) == 0:
        return out
    qd = float_descriptors(query.descriptors)
    for j, c in enumerate(candidates):
        if len(c) < 4:
            continue
        if c.dim != query.dim:
            raise InputError(f"candidate {j} has {c.dim}-d descriptors, query {query.dim}-d")
        cd = float_descriptors(c.descriptors)
        mt = matcher(qd, cd) if matcher is not None else \
            match_descriptors(qd, cd, method=method, ratio=ratio)
        if mt.shape[0] >= max(4, min_matches):
            out[j] = homography_inliers(query.keypoints[mt[:, 0], :2], c.keypoints[mt[:, 1], :2],
                                        threshold=threshold, max_iters=max_iters)
    return out
