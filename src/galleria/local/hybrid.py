"""Local-to-global fusion scores (pure functions): the core of the ``hybrid`` pipeline.

A global descriptor and a local index disagree in *scale*: a cosine of 0.6 may be a
weak global match on one gallery and a strong one on the next, and ASMK similarities
of true matches run from 0.02 (a landmark from another side) to 0.5 (the same
cover). Neither scale is comparable across sources or across galleries, so the
fusion never adds raw scores. Per query, each source's scores are standardised
against its *own* shortlist (mean and standard deviation of its top ``C`` scores):
a candidate far above the crowd of that source's shortlist is a strong match of
that source, whatever its raw scale. The combined score of a candidate is the sum
of its two standardised scores (a candidate outside a source's shortlist gets that
source's exact score when the caller has it, else the shortlist's last score).

On landmarks the local scores of a shortlist are flat (no candidate stands out),
their standardised values are small and the global order wins; on product covers
the right image stands many deviations above the local crowd and wins even when
the global model ranks it 50th. This is what keeps the combined pipeline at least
as good as the better of its parts on galleries nobody tuned on (see
benchmarks/results/local-hybrid.md).

Shapes: one query at a time; ``(n,)`` float64 score vectors over ``n`` candidates.
"""

from __future__ import annotations

import numpy as np

from galleria.errors import InputError

#: Guards the standard deviation of a flat shortlist (all scores equal).
EPS = 1e-9


def standardize(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(scores - mean(reference)) / std(reference)`` (``(n,)`` float64).

    ``reference``: the source's own shortlist scores (best first). A shortlist of one
    score or a flat one has no spread: its scores are returned centred, unscaled.
    """
    s = np.asarray(scores, np.float64)
    r = np.asarray(reference, np.float64).reshape(-1)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return np.zeros_like(s)
    sd = float(r.std()) if r.size > 1 else 0.0
    return (s - float(r.mean())) / (sd if sd > EPS else 1.0)


def fused_scores(global_scores: np.ndarray, local_scores: np.ndarray, *,
                 global_ref: np.ndarray, local_ref: np.ndarray,
                 local_weight: float = 1.0) -> np.ndarray:
    """Combined score of ``n`` candidates: ``z_global + local_weight * z_local``.

    Args:
        global_scores, local_scores: ``(n,)`` each source's score of each candidate.
        global_ref, local_ref: each source's shortlist scores (its top ``C``).
        local_weight: weight of the local term (1: equal trust).

    Returns:
        ``(n,)`` float64, higher is better.
    """
    g = np.asarray(global_scores, np.float64).reshape(-1)
    loc = np.asarray(local_scores, np.float64).reshape(-1)
    if g.shape != loc.shape:
        raise InputError(f"global {g.shape} and local {loc.shape} scores must match")
    if not local_weight >= 0:
        raise InputError(f"local_weight must be >= 0; got {local_weight}")
    return standardize(g, global_ref) + float(local_weight) * standardize(loc, local_ref)


def fused_pairwise(global_pair: np.ndarray, local_pair: np.ndarray, *,
                   global_ref: np.ndarray, local_ref: np.ndarray,
                   local_weight: float = 1.0, scale: float = 4.0) -> np.ndarray:
    """Image-to-image similarities of the fused space in ``[0, 1]`` (``(n, n)``), for MDS.

    Each source's pairwise similarities are standardised with the *query's*
    shortlist statistics (so a pair counts as close when it is as similar as a
    strong match of the query), summed as in :func:`fused_scores` and mapped to
    ``[0, 1]`` by a logistic of ``sum / scale`` (diagonal 1).
    """
    z = fused_scores(np.asarray(global_pair).reshape(-1), np.asarray(local_pair).reshape(-1),
                     global_ref=global_ref, local_ref=local_ref, local_weight=local_weight)
    n = int(np.asarray(global_pair).shape[0])
    s = 1.0 / (1.0 + np.exp(-np.clip(z / scale, -50, 50)))
    s = s.reshape(n, n)
    np.fill_diagonal(s, 1.0)
    return s


def to_unit(z: np.ndarray, scale: float = 4.0) -> np.ndarray:
    """Logistic map of fused scores to ``(0, 1)`` (the MDS similarity of the query)."""
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, np.float64) / scale, -50, 50)))
