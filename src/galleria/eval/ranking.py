"""Ranking a score matrix (shared by the revisitop and label metrics)."""

from __future__ import annotations

import numpy as np

from galleria.errors import InputError

# Elements (queries x gallery items) handled per chunk.
_CHUNK_ELEMENTS = 1 << 22

# --------------------------------------------------------------------------- #


def _check_scores(scores: np.ndarray) -> np.ndarray:
    if not np.issubdtype(scores.dtype, np.floating):
        raise InputError(f"scores must be floating point, got dtype {scores.dtype}")
    if scores.shape[1] == 0:
        raise InputError("scores have an empty gallery (0 columns)")
    if np.isnan(scores).any():
        raise InputError("scores contain NaN")
    return scores


def rank_gallery(scores: np.ndarray, *, depth: int | None = None) -> np.ndarray:
    """Gallery indices sorted by descending score, ties by ascending gallery index.

    Args:
        scores: ``(Q, G)`` float similarities (higher is better, no NaN).
        depth: keep only the first ``depth`` ranks (default all ``G``). A
            partial sort is used when ``depth`` is small; the result equals the
            first ``depth`` columns of the full ranking, ties included.

    Returns:
        ``(Q, depth)`` int64 gallery indices, best first.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise InputError(f"scores must have shape (Q, G); got {scores.shape}")
    g = scores.shape[1]
    depth = g if depth is None else max(0, min(int(depth), g))
    neg = -scores
    if depth == g or depth * 4 >= g:
        return np.argsort(neg, axis=1, kind="stable")[:, :depth].astype(np.int64, copy=False)
    if depth == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    # Exact top-depth with stable ties: everything strictly better than the
    # depth-th value, then the tied items in gallery order until depth is filled.
    thr = np.partition(neg, depth - 1, axis=1)[:, depth - 1 : depth]
    better = neg < thr
    tied = neg == thr
    need = depth - better.sum(axis=1, keepdims=True)
    select = better | (tied & (np.cumsum(tied, axis=1) <= need))
    cols = np.nonzero(select)[1].reshape(scores.shape[0], depth)
    sub = np.take_along_axis(neg, cols, axis=1)
    order = np.argsort(sub, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- #
# Label-based metrics
