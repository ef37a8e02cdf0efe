"""Descriptor-level post-processing: alpha query expansion and database augmentation.

Pure functions on L2-normalised row vectors (cosine similarity = inner
product), after Radenović et al., "Fine-tuning CNN Image Retrieval with No
Human Annotation" (TPAMI 2018):

* alpha-QE: ``q' = normalise(q + sum_{i<=k} max(q.x_i, 0)^alpha * x_i)`` over the
  ``k`` gallery neighbours ``x_i`` of ``q`` — the query itself takes part with
  weight 1 (its similarity to itself).
* alpha-DBA: the same for every gallery vector against the rest of the gallery
  (its own row excluded from its neighbours; it takes part with weight 1).
  Neighbours are found in the original gallery, so the result does not depend
  on row order.

``alpha = 0`` gives plain average QE / DBA. Similarities are computed in
chunks of rows, so large galleries stay within memory.
"""

from __future__ import annotations

import numpy as np

from galleria.errors import InputError
from galleria.validate import as_embeddings, l2_normalize

_CHUNK_ELEMENTS = 1 << 22


def alpha_query_expansion(
    queries: np.ndarray,
    gallery: np.ndarray,
    *,
    k: int,
    alpha: float,
    query_gallery_index: np.ndarray | None = None,
) -> np.ndarray:
    """alpha-QE: re-weight each query with its top-``k`` gallery neighbours.

    Args:
        queries: ``(Q, D)`` L2-normalised query vectors.
        gallery: ``(N, D)`` L2-normalised gallery vectors.
        k: number of gallery neighbours (``0`` = no expansion; capped at ``N``).
        alpha: weight exponent, ``w_i = max(sim_i, 0) ** alpha``.
        query_gallery_index: ``(Q,)`` int; gallery row ``query_gallery_index[q]``
            is query ``q`` itself and is not used as a neighbour (``-1`` = none).

    Returns:
        ``(Q, D)`` float32 expanded queries, L2-normalised.
    """
    q = as_embeddings(queries, name="queries")
    g = as_embeddings(gallery, name="gallery", dim=q.shape[1])
    k = int(k)
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    if alpha < 0 or not np.isfinite(alpha):
        raise InputError(f"alpha must be a finite number >= 0, got {alpha}")
    exclude = None
    if query_gallery_index is not None:
        exclude = np.asarray(query_gallery_index, dtype=np.int64).reshape(-1)
        if exclude.shape != (q.shape[0],) or (exclude >= g.shape[0]).any() or (exclude < -1).any():
            raise InputError(
                f"query_gallery_index must be ({q.shape[0]},) values in [-1, {g.shape[0]})"
            )
    k = min(k, g.shape[0] - (1 if exclude is not None and (exclude >= 0).any() else 0))
    if k <= 0:
        return l2_normalize(q.copy())
    out = np.empty_like(q)
    step = max(1, _CHUNK_ELEMENTS // g.shape[0])
    for s in range(0, q.shape[0], step):
        qc = q[s : s + step]
        sims = qc @ g.T
        if exclude is not None:
            ex = exclude[s : s + step]
            rows = np.flatnonzero(ex >= 0)
            sims[rows, ex[rows]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        ts = np.take_along_axis(sims, top, axis=1)
        w = np.where(np.isfinite(ts), np.maximum(ts, 0.0), 0.0) ** np.float32(alpha)
        w[~np.isfinite(ts)] = 0.0
        out[s : s + step] = qc + np.einsum("qk,qkd->qd", w, g[top])
    return l2_normalize(out)


def database_augmentation(gallery: np.ndarray, *, k: int, alpha: float) -> np.ndarray:
    """alpha-DBA: replace each gallery vector by the weighted sum of it and its ``k`` neighbours.

    Args:
        gallery: ``(N, D)`` L2-normalised gallery vectors.
        k: neighbours per item, the item itself not counted (``0`` = unchanged).
        alpha: weight exponent, as in :func:`alpha_query_expansion`.

    Returns:
        ``(N, D)`` float32 augmented gallery, L2-normalised.
    """
    g = as_embeddings(gallery, name="gallery")
    return alpha_query_expansion(
        g, g, k=k, alpha=alpha, query_gallery_index=np.arange(g.shape[0], dtype=np.int64)
    )
