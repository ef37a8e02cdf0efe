"""Local-to-global fusion scores (pure functions): the core of the ``hybrid`` pipeline.

A global descriptor and a local index disagree in *scale*: a cosine of 0.6 may be a
weak global match on one gallery and a strong one on the next, and ASMK similarities
of true matches run from 0.02 (a landmark from another side) to 0.5 (the same
cover). Neither scale is comparable across sources or across galleries, so the
fusion never adds raw scores. Per query, each source's scores are standardised
against its *own* shortlist (mean and standard deviation of its top ``C`` scores),
and only what stands out counts as evidence: ``max(z - t, 0)`` with ``t = 3``
standard deviations (a shortlist of noise, e.g. the visual-word collisions of a
landmark query in a local index, rarely has a candidate 3 deviations above its own
crowd; a true match of a product cover is often 10-20 above). The fused score is

    ``relu(z_global - t) + w * relu(z_local - t) + eps * z_global``

(``w = 1``, ``eps = 0.01``): strong evidence of either source decides, and where
neither has any the global order stands (the global model is the better fallback
for landmarks and categories, whose local scores are collisions). A candidate
outside a source's shortlist gets the shortlist's last score of that source.

On landmarks the local scores of a shortlist are flat, no candidate clears ``t`` and
the global order wins; on product covers the right image stands many deviations
above the local crowd and wins even when the global model ranks it 50th. This is
what keeps the combined pipeline at least as good as the better of its parts on
galleries nobody tuned on (benchmarks/results/local-hybrid.md).

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


def evidence(z: np.ndarray, threshold: float) -> np.ndarray:
    """``max(z - threshold, 0)``: how far a standardised score stands out of its crowd."""
    return np.maximum(np.asarray(z, np.float64) - float(threshold), 0.0)


def fused_scores(global_scores: np.ndarray, local_scores: np.ndarray, *,
                 global_ref: np.ndarray, local_ref: np.ndarray,
                 local_weight: float = 1.0, threshold: float = 3.0,
                 tie: float = 0.01) -> np.ndarray:
    """Fused score of ``n`` candidates (see the module docstring).

    Args:
        global_scores, local_scores: ``(n,)`` each source's score of each candidate.
        global_ref, local_ref: each source's shortlist scores (its top ``C``).
        local_weight: weight ``w`` of the local evidence (1: equal trust).
        threshold: ``t``, standard deviations above the shortlist where evidence starts.
        tie: ``eps``, weight of the standardised global score (the order without
            evidence).

    Returns:
        ``(n,)`` float64, higher is better.
    """
    g = np.asarray(global_scores, np.float64).reshape(-1)
    loc = np.asarray(local_scores, np.float64).reshape(-1)
    if g.shape != loc.shape:
        raise InputError(f"global {g.shape} and local {loc.shape} scores must match")
    if not (local_weight >= 0 and threshold >= 0 and tie >= 0):
        raise InputError(f"local_weight, threshold and tie must be >= 0; got {local_weight}, "
                         f"{threshold}, {tie}")
    gz, lz = standardize(g, global_ref), standardize(loc, local_ref)
    return evidence(gz, threshold) + float(local_weight) * evidence(lz, threshold) + tie * gz


def fused_pairwise(global_pair: np.ndarray, local_pair: np.ndarray, *,
                   global_ref: np.ndarray, local_ref: np.ndarray,
                   local_weight: float = 1.0, threshold: float = 3.0, tie: float = 0.01,
                   scale: float = 4.0) -> np.ndarray:
    """Image-to-image similarities of the fused space in ``[0, 1]`` (``(n, n)``), for MDS.

    Each source's pairwise similarities are standardised with the *query's*
    shortlist statistics (so a pair counts as close when it is as similar as a
    strong match of the query), summed as in :func:`fused_scores` and mapped to
    ``[0, 1]`` by ``2 * logistic(score / scale) - 1`` (diagonal 1).
    """
    z = fused_scores(np.asarray(global_pair).reshape(-1), np.asarray(local_pair).reshape(-1),
                     global_ref=global_ref, local_ref=local_ref, local_weight=local_weight,
                     threshold=threshold, tie=tie)
    n = int(np.asarray(global_pair).shape[0])
    s = to_unit(z, scale).reshape(n, n)
    np.fill_diagonal(s, 1.0)
    return s


def to_unit(score: np.ndarray, scale: float = 4.0) -> np.ndarray:
    """Fused scores (``>= -tie * |z|``, mostly ``>= 0``) to ``[0, 1)``:
    ``2 * logistic(max(score, 0) / scale) - 1`` (0: no evidence; the MDS similarity)."""
    x = np.maximum(np.asarray(score, np.float64), 0.0) / scale
    return 2.0 / (1.0 + np.exp(-np.clip(x, 0, 50))) - 1.0
