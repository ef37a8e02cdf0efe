"""On-the-fly global re-ranking features by multidimensional scaling (pure functions).

Local-to-global re-ranking (Aiger, Cao, Chen, Araujo, arXiv 2509.04351;
docs/methods.md, local-to-global): take the query and its top-``k`` local-search results, their
pairwise local similarities ``S`` (query-to-image and image-to-image), turn them
into distances ``D = 1 - S^p``, embed the ``k + 1`` points with metric MDS
(classical MDS warm start, then SMACOF on the raw stress), and re-rank the
candidates by the cosine between their embedding and the query's, optionally
blended with a conventional global descriptor score:
``score = (1 - w) cos_mds + w s_global``.

Shapes: ``S`` and ``D`` are ``(n, n)`` with the query at index 0; embeddings
``(n, dim)``.
"""

from __future__ import annotations

import numpy as np

from galleria.errors import InputError

#: Settings reported by a re-implementation of the paper (docs/methods.md), on ROxford/RParis
#: (4,993 / 6,322 database images): top-k embedded, candidates re-ranked, exponent, blend.
PAPER_K = 700
PAPER_CANDIDATES = 1600
PAPER_GALLERY = 4993
PAPER_P = 0.01
PAPER_BLEND = 0.19


def scaled_defaults(gallery_size: int) -> tuple[int, int]:
    """``(k, candidates)``: the paper's 700 / 1,600 scaled by ``gallery / 4,993``.

    Never above the paper's values, never below 5 / 10 (nor above the gallery).
    """
    g = max(1, int(gallery_size))
    f = g / PAPER_GALLERY
    k = int(min(PAPER_K, max(5, round(PAPER_K * f))))
    c = int(min(PAPER_CANDIDATES, max(10, round(PAPER_CANDIDATES * f))))
    return min(k, g), min(max(c, k), g)


def similarity_to_distance(s: np.ndarray, p: float) -> np.ndarray:
    """``1 - clip(s, 0, 1)^p``, symmetrised, zero diagonal (``(n, n)``)."""
    if not p > 0:
        raise InputError(f"p must be positive; got {p}")
    s = np.clip(np.asarray(s, np.float64), 0.0, 1.0)
    s = 0.5 * (s + s.T)
    d = 1.0 - s**p
    np.fill_diagonal(d, 0.0)
    return d


def floor_unmatched(query_sims: np.ndarray, pairwise: np.ndarray) -> np.ndarray:
    """``(k, k)`` pairwise similarities with every off-diagonal 0 raised to the smallest
    positive similarity among ``query_sims`` ``(k,)`` and ``pairwise``.

    A binarised local similarity of 0 means "no visual word in common": no evidence,
    not "maximally different". Under ``D = 1 - S^p`` with ``p = 0.01`` a distance is
    about ``p |ln S|`` (0.03-0.08 for every scored pair) while a 0 becomes 1: a few
    such pairs dominate the stress, the embedding spends itself on them and the
    query's cosines turn to noise (``local+mds`` R@1 1.7 % vs ``local`` 98.3 % on 100
    covers + 400 unrelated images). Floored, an unmatched pair is as far apart as the
    least similar scored pair. Without any positive similarity the input is returned.
    """
    pair = np.array(pairwise, np.float64, copy=True)
    q = np.asarray(query_sims, np.float64).reshape(-1)
    off = ~np.eye(pair.shape[0], dtype=bool)
    pos = np.concatenate([q[q > 0], pair[off & (pair > 0)]])
    if pos.size:
        pair[off & (pair <= 0)] = pos.min()
    return pair


def classical_mds(d: np.ndarray, dim: int) -> np.ndarray:
    """Torgerson's classical MDS: ``(n, n)`` distances -> ``(n, dim)`` centred coordinates.

    Double-centres ``-D^2 / 2`` and keeps the ``dim`` largest eigenpairs (negative
    eigenvalues, from non-Euclidean input, are dropped: their columns are 0).
    """
    d = np.asarray(d, np.float64)
    n = d.shape[0]
    if d.shape != (n, n):
        raise InputError(f"distances must be square (n, n); got {d.shape}")
    if dim < 1:
        raise InputError(f"dim must be >= 1; got {dim}")
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ (d**2) @ j
    w, v = np.linalg.eigh(0.5 * (b + b.T))
    order = np.argsort(w)[::-1][: min(dim, n)]
    x = v[:, order] * np.sqrt(np.maximum(w[order], 0.0))
    if x.shape[1] < dim:
        x = np.concatenate([x, np.zeros((n, dim - x.shape[1]))], axis=1)
    return x


def _pdist(x: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", x, x)
    g = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(g, 0.0)
    return np.sqrt(np.maximum(g, 0.0))


def stress(d: np.ndarray, x: np.ndarray) -> float:
    """Raw stress ``sum_{i<j} (d_ij - |x_i - x_j|)^2``."""
    e = _pdist(x)
    return float(0.5 * ((np.asarray(d, np.float64) - e) ** 2).sum())


def smacof(
    d: np.ndarray, x0: np.ndarray, *, max_iter: int = 100, eps: float = 1e-5
) -> tuple[np.ndarray, float]:
    """Metric MDS by SMACOF (Guttman transform; de Leeuw 1977), unit weights.

    Args:
        d: ``(n, n)`` symmetric target distances, zero diagonal.
        x0: ``(n, dim)`` start (e.g. :func:`classical_mds`).
        max_iter: iteration cap; stops earlier when the stress falls by less than
            ``eps`` (relative) in one iteration.

    Returns:
        ``(X (n, dim), final raw stress)``. The stress never increases.
    """
    d = np.asarray(d, np.float64)
    x = np.array(x0, np.float64, copy=True)
    n = d.shape[0]
    if x.shape[0] != n or d.shape != (n, n):
        raise InputError(f"distances {d.shape} and start {x.shape} do not fit")
    e = _pdist(x)
    prev = float(0.5 * ((d - e) ** 2).sum())
    for _ in range(int(max_iter)):
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(e > 1e-12, -d / e, 0.0)
        np.fill_diagonal(b, 0.0)
        np.fill_diagonal(b, -b.sum(axis=1))
        x = (b @ x) / n
        e = _pdist(x)
        cur = float(0.5 * ((d - e) ** 2).sum())
        done = prev - cur <= eps * max(prev, 1e-12)
        prev = cur
        if done:
            break
    return x, prev


def mds_embedding(
    s: np.ndarray, *, p: float = PAPER_P, dim: int = 32, max_iter: int = 100, eps: float = 1e-5
) -> np.ndarray:
    """``(n, n)`` similarities (query first) -> ``(n, dim)`` SMACOF embedding."""
    d = similarity_to_distance(s, p)
    x0 = classical_mds(d, dim)
    x, _ = smacof(d, x0, max_iter=max_iter, eps=eps)
    return x


def cosine_to_query(x: np.ndarray) -> np.ndarray:
    """Cosine between row 0 and rows 1..n-1 of a (centred) embedding -> ``(n - 1,)``."""
    x = x - x.mean(axis=0, keepdims=True)
    nrm = np.linalg.norm(x, axis=1)
    nrm = np.where(nrm > 1e-12, nrm, 1.0)
    return (x[1:] @ x[0]) / (nrm[1:] * nrm[0])


def mds_rerank_scores(
    query_sims: np.ndarray,
    pairwise: np.ndarray,
    *,
    p: float = PAPER_P,
    dim: int = 32,
    max_iter: int = 100,
    global_scores: np.ndarray | None = None,
    blend: float = 0.0,
) -> np.ndarray:
    """New scores of ``k`` candidates from their local similarities.

    Args:
        query_sims: ``(k,)`` query-to-candidate similarities.
        pairwise: ``(k, k)`` candidate-to-candidate similarities.
        p: exponent of ``D = 1 - S^p``.
        dim: embedding dimension (at most ``k``).
        global_scores: ``(k,)`` global-descriptor similarities for the blend.
        blend: weight ``w`` of the global score.

    Returns:
        ``(k,)`` float32 ``(1 - w) cos + w global`` (``cos`` alone without a global).
    """
    q = np.asarray(query_sims, np.float64).reshape(-1)
    k = q.size
    if pairwise.shape != (k, k):
        raise InputError(f"pairwise must be ({k}, {k}); got {pairwise.shape}")
    if k == 0:
        return np.zeros(0, np.float32)
    s = np.empty((k + 1, k + 1))
    s[0, 0] = 1.0
    s[0, 1:] = s[1:, 0] = q
    s[1:, 1:] = pairwise
    x = mds_embedding(s, p=p, dim=max(1, min(dim, k)), max_iter=max_iter)
    out = cosine_to_query(x)
    if global_scores is not None and blend:
        g = np.asarray(global_scores, np.float64).reshape(-1)
        if g.shape != (k,):
            raise InputError(f"global_scores must be ({k},); got {g.shape}")
        out = (1.0 - blend) * out + blend * g
    return out.astype(np.float32)
