"""Local-to-global fusion (pure functions): the core of the ``hybrid`` pipeline.

Geometric evidence first (:func:`verify_shortlist`, :func:`verified_order`): the
``hybrid`` pipeline spatially verifies a small union of the local and the global
shortlists (MAGSAC++ homography inliers of mutual + ratio-test matches; a pair with
fewer tentative matches than the inlier bar is skipped, it cannot reach the bar)
and ranks first the candidates with at least ``min_inliers`` inliers, by inliers,
except that a first candidate of the fused order (the global top-1) that verifies itself
is overturned only by significantly more inliers (:func:`overturns`: a verified
near-duplicate of another class, e.g. Caltech-101's ``Faces_easy`` crops of ``Faces``
photos, has a few more inliers than the right global top-1, within count noise).
The bar is gallery-independent: it counts geometrically consistent matches, not a
score on a gallery-dependent scale. Everything else follows in the order of the
fused score below, in which unverified local scores carry no weight by default
(``local_weight = 0``): an ASMK score that stands out of its shortlist is not
evidence of the same object on a category or landmark gallery (it fired on wrong
Caltech-101 items), and a verified match needs no score evidence.

The fused score (the order of whatever does not verify):

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
from galleria.local.matching import verify_pairs
from galleria.types import LocalFeatures

#: How verified candidates are ordered among themselves: by inlier count, or in the
#: fused order (the global order by default).
VERIFIED_BY = ("inliers", "fused")
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


def verify_shortlist(query: LocalFeatures, candidates: list[LocalFeatures], *,
                     min_matches: int, method: str = "mutual+ratio", ratio: float = 0.8,
                     threshold: float = 6.0, max_iters: int = 1000) -> np.ndarray:
    """``(n,)`` int32 MAGSAC++ homography inliers of ``query`` against each candidate.

    A pair with fewer than ``min_matches`` tentative matches (``method``:
    :func:`~galleria.local.matching.match_descriptors`) is not verified and counts 0
    inliers: it cannot reach an inlier bar of ``min_matches``, and skipping it is what
    keeps the verification of a shortlist cheap (most wrong pairs of a mutual +
    ratio-test matcher have a handful of matches).
    """
    match = (lambda a, b: mutual_ratio_matches(a, b, ratio)) \
        if method == "mutual+ratio" else None
    return verify_pairs(query, candidates, method=method, ratio=ratio, threshold=threshold,
                        max_iters=max_iters, min_matches=min_matches, matcher=match)


def mutual_ratio_matches(a: np.ndarray, b: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """``match_descriptors(a, b, method="mutual+ratio")`` -> ``(k, 2)`` int64, faster.

    The same matches (but for exact ties of similarities): the ratio test (nearest L2
    distance < ``ratio`` x the second nearest) is evaluated only on the rows of mutual
    nearest neighbours, with a row maximum instead of a partition of every row of the
    ``(n, m)`` similarity matrix (most of the cost of the general matcher).
    """
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m < 2:
        return np.zeros((0, 2), np.int64)
    s = a @ b.T  # (n, m) cosine
    nn = np.argmax(s, axis=1)
    best = s[np.arange(n), nn]
    # mutual: i is the best of its nearest neighbour's column (a column maximum is a fast
    # reduction; the column argmax of the general matcher is a slow strided one). Exact
    # ties of a column's maximum are measure-zero for real descriptors.
    i = np.flatnonzero(best >= s.max(axis=0)[nn])
    if i.size == 0:
        return np.zeros((0, 2), np.int64)
    rows = s[i]
    rows[np.arange(i.size), nn[i]] = -np.inf
    top2 = np.stack([best[i], rows.max(axis=1)], axis=1)
    d = np.sqrt(np.maximum(2.0 - 2.0 * top2, 0.0))
    i = i[d[:, 0] < ratio * d[:, 1]]
    return np.stack([i, nn[i]], axis=1).astype(np.int64)


def overturns(inliers: np.ndarray, first: float, margin: float) -> np.ndarray:
    """``(n,)`` bool: which inlier counts beat a verified first candidate's ``first``.

    ``n - first > margin * sqrt(n + first)``: more inliers than the first by more than
    ``margin`` standard deviations of the difference of two Poisson counts. Inlier
    counts of two true matches of one object vary with viewpoint, blur and crop; a
    difference inside that noise is no evidence that the challenger is the better answer
    than the one both sources agree on. ``margin = 0``: any larger count overturns.
    """
    n = np.asarray(inliers, np.float64)
    return n - first > margin * np.sqrt(np.maximum(n + first, 0.0))


def verified_order(fused: np.ndarray, inliers: np.ndarray, min_inliers: int, *,
                   scale: float = 4.0, by: str = "inliers",
                   keep_first: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Order of ``n`` candidates: verified first (by inliers), then by fused score.

    Args:
        fused: ``(n,)`` fused scores (:func:`fused_scores`; higher is better).
        inliers: ``(n,)`` inlier counts (0 for candidates not verified).
        min_inliers: the bar (>= 2) a verified candidate clears.
        keep_first: with ``by="inliers"`` and ``> 0``: when the fused order's first
            candidate (the global top-1 by default) verifies itself, only verified
            candidates with significantly more inliers (:func:`overturns` with this
            margin) come before it; it comes before every other candidate. ``0``: the
            plain inlier order.

    Returns:
        ``(order (n,) int64, score (n,) float64)``, best first: a verified candidate's
        score is its inlier count (``>= min_inliers``); a first candidate kept by
        ``keep_first`` scores 0.5 above the largest count it keeps behind it (below
        every count that overturns it); any other's is ``tanh(fused / scale)`` in
        ``(-1, 1)``. Ties keep the fused order.
    """
    f = np.asarray(fused, np.float64).reshape(-1)
    inl = np.asarray(inliers, np.float64).reshape(-1)
    if f.shape != inl.shape:
        raise InputError(f"fused {f.shape} and inliers {inl.shape} must match")
    if min_inliers < 2:
        raise InputError(f"min_inliers must be >= 2 (scores below 1 are unverified); "
                         f"got {min_inliers}")
    if by not in VERIFIED_BY:
        raise InputError(f"by must be one of {VERIFIED_BY}; got {by!r}")
    if not keep_first >= 0:
        raise InputError(f"keep_first must be >= 0; got {keep_first}")
    base = np.argsort(-f, kind="stable")  # the fused order breaks ties
    ok = inl[base] >= min_inliers
    unit = np.tanh(f[base] / scale)
    if by == "inliers":
        score = np.where(ok, inl[base], unit)
        if keep_first > 0 and ok.size and ok[0]:
            # the verified first candidate: behind what overturns it, before the rest
            n1 = float(inl[base[0]])
            kept = ok & ~overturns(inl[base], n1, keep_first)
            kept[0] = False
            score[0] = (float(score[kept].max()) + 0.5) if kept.any() else n1
    else:  # verified first, in the fused order: min_inliers + 1 + unit in (min_inliers, +2)
        score = np.where(ok, min_inliers + 1.0 + unit, unit)
    o = np.argsort(-score, kind="stable")
    return base[o], score[o]
