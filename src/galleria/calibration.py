"""Calibrated match probabilities: a monotone map from a pipeline's score to P(match).

Every pipeline scores on its own scale (cosine for ``global``, inliers + a
fraction for ``global+sv``, aggregated-kernel similarity for ``local``, an MDS
cosine for ``local+mds``). A user cannot threshold those. :func:`fit` learns,
per pipeline, a non-decreasing map ``score -> probability in [0, 1]`` from
pseudo-queries (:mod:`galleria.images.pseudo`): the score of the item a view was
made from is a positive, the scores of the other items the pipeline returned for
that view are negatives. :func:`apply` maps a ``(Q, K)`` score matrix through it.

The probability means: *among the results this pipeline returns at this score,
the fraction that are the very item photographed*, as estimated on phone-like
views of the gallery's own images. It is comparable across pipelines (each has
its own map onto the same [0, 1] scale). ``0.5`` is the natural threshold.

Two methods (both pure, parameters are a small JSON dict):

``isotonic`` (default)
    pool-adjacent-violators on the sorted scores, block means smoothed towards
    the base rate (one pseudo-observation, so a block of 3 positives does not
    claim certainty), merged to at most ``max_knots`` knots; scores between
    knots are interpolated linearly, outside them clamped.
``logistic``
    Platt scaling ``p = 1 / (1 + exp(-(a * s + b)))`` (``a >= 0``), by Newton's
    method on the log-loss with a small ridge.

::

    params = fit(scores, truth)              # scores (Q, K) float, truth (Q, K) bool
    probs = apply(params, result.scores)     # (Q, K) float32 in [0, 1]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from galleria.errors import FormatError, InputError

CALIBRATION_TYPE = "match-probability"
FORMAT_VERSION = 1
METHODS = ("isotonic", "logistic")


def _pairs(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64)
    t = np.asarray(truth, bool)
    if s.ndim != 2 or s.shape != t.shape:
        raise InputError(f"scores and truth must be (Q, K) of one shape; got {s.shape} and "
                         f"{t.shape}")
    ok = np.isfinite(s)
    return s[ok], t[ok].astype(np.float64)


def pav(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool adjacent violators: ``(block values, block weights, block ends)`` of the
    weighted least-squares non-decreasing fit to ``y`` (already in score order)."""
    vals: list[float] = []
    wts: list[float] = []
    ends: list[int] = []
    for i, (yi, wi) in enumerate(zip(y.tolist(), w.tolist(), strict=True)):
        vals.append(yi)
        wts.append(wi)
        ends.append(i)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            tot = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / tot
            wts[-2] = tot
            ends[-2] = ends[-1]
            del vals[-1], wts[-1], ends[-1]
    return np.asarray(vals), np.asarray(wts), np.asarray(ends, np.int64)


def _isotonic(s: np.ndarray, y: np.ndarray, max_knots: int) -> dict[str, Any]:
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # equal scores are one observation group (their order must not matter)
    uniq, start, counts = np.unique(s, return_index=True, return_counts=True)
    ysum = np.add.reduceat(y, start)
    vals, wts, ends = pav(ysum / counts, counts.astype(np.float64))
    begins = np.r_[0, ends[:-1] + 1]
    # block centre: weighted mean score of its members
    cum = np.r_[0.0, np.cumsum(uniq * counts)]
    cnt = np.r_[0.0, np.cumsum(counts)]
    xs = (cum[ends + 1] - cum[begins]) / (cnt[ends + 1] - cnt[begins])
    pos = vals * wts
    xs, pos, wts = _merge_knots(xs, pos, wts, max_knots)
    base = float(y.mean())
    ys = (pos + base) / (wts + 1.0)  # one pseudo-observation at the base rate
    ys = np.maximum.accumulate(ys)
    return {"x": [float(v) for v in xs], "y": [float(v) for v in ys]}


def _merge_knots(xs: np.ndarray, pos: np.ndarray, wts: np.ndarray, max_knots: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge adjacent blocks (the lightest pair first) until at most ``max_knots`` remain;
    the merged value is the weighted mean, so the sequence stays non-decreasing."""
    xs, pos, wts = list(xs), list(pos), list(wts)
    while len(xs) > max_knots:
        pair = [wts[i] + wts[i + 1] for i in range(len(xs) - 1)]
        i = int(np.argmin(pair))
        w = wts[i] + wts[i + 1]
        xs[i] = (xs[i] * wts[i] + xs[i + 1] * wts[i + 1]) / w
        pos[i] = pos[i] + pos[i + 1]
        wts[i] = w
        del xs[i + 1], pos[i + 1], wts[i + 1]
    return np.asarray(xs), np.asarray(pos), np.asarray(wts)


def _logistic(s: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iters: int = 50
              ) -> dict[str, Any]:
    mu, sd = float(s.mean()), float(s.std()) or 1.0
    z = (s - mu) / sd
    a, b = 1.0, 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        w = np.maximum(p * (1 - p), 1e-9)
        g = np.array([np.sum((p - y) * z) + ridge * a, np.sum(p - y)])
        h = np.array([[np.sum(w * z * z) + ridge, np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
        step = np.linalg.solve(h + 1e-9 * np.eye(2), g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    a = max(a, 0.0)  # monotone non-decreasing by construction
    return {"a": float(a / sd), "b": float(b - a * mu / sd)}


def fit(scores: np.ndarray, truth: np.ndarray, *, method: str = "isotonic",
        max_knots: int = 24) -> dict[str, Any]:
    """Fit a monotone score -> probability map.

    Args:
        scores: ``(Q, K)`` scores of returned results (``-inf`` / NaN: missing, ignored).
        truth: ``(Q, K)`` bool, True where the result is the query's true item.
        method: ``isotonic`` or ``logistic``.
        max_knots: most knots of the isotonic map (the stored record's size).

    Returns:
        A JSON dict ``{type, format_version, method, n_pos, n_neg, base_rate, ...}``
        plus ``x``/``y`` knots (isotonic) or ``a``/``b`` (logistic); :func:`apply`
        reads it.
    """
    if method not in METHODS:
        raise InputError(f"calibration method must be one of {METHODS}; got {method!r}")
    if max_knots < 2:
        raise InputError(f"max_knots must be >= 2; got {max_knots}")
    s, y = _pairs(scores, truth)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"calibration needs positives and negatives; got {n_pos} and {n_neg}")
    head = {"type": CALIBRATION_TYPE, "format_version": FORMAT_VERSION, "method": method,
            "n_pos": n_pos, "n_neg": n_neg, "base_rate": round(n_pos / len(y), 6)}
    body = _isotonic(s, y, max_knots) if method == "isotonic" else _logistic(s, y)
    return {**head, **body}


def check(params: Any) -> dict[str, Any]:
    """``params`` if it is a calibration this version reads, else a FormatError."""
    if not isinstance(params, dict) or params.get("type") != CALIBRATION_TYPE:
        raise FormatError(f"not a {CALIBRATION_TYPE} calibration: {str(params)[:80]}")
    if params.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"calibration format {params.get('format_version')} is not "
                          f"{FORMAT_VERSION}: re-run `galleria tune`")
    if params.get("method") not in METHODS:
        raise FormatError(f"unknown calibration method {params.get('method')!r}")
    return params


def apply(params: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """``(Q, K)`` scores -> ``(Q, K)`` float32 probabilities in ``[0, 1]``, non-decreasing
    in the score; a missing result (``-inf`` / NaN score) gets 0."""
    p = check(params)
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s)
    out = np.zeros(s.shape, np.float64)
    if p["method"] == "isotonic":
        x, y = np.asarray(p["x"], np.float64), np.asarray(p["y"], np.float64)
        out[ok] = np.interp(s[ok], x, y)
    else:
        z = np.clip(p["a"] * s[ok] + p["b"], -60, 60)
        out[ok] = 1.0 / (1.0 + np.exp(-z))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def score_at(params: dict[str, Any], probability: float) -> float | None:
    """The smallest score whose calibrated probability is at least ``probability`` (the
    inverse of :func:`apply`; ``None`` when no score reaches it). A threshold on raw
    scores that means "P(match) >= probability" (``galleria dedup --min-probability``)."""
    p = check(params)
    q = float(probability)
    if not 0.0 <= q <= 1.0:
        raise InputError(f"a probability is in [0, 1]; got {probability!r}")
    if p["method"] == "isotonic":
        x, y = np.asarray(p["x"], np.float64), np.asarray(p["y"], np.float64)
        hit = np.flatnonzero(y >= q)
        if hit.size == 0:
            return None
        i = int(hit[0])
        if i == 0 or y[i] == y[i - 1]:
            return float(x[i])
        return float(x[i - 1] + (q - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))
    a, b = float(p["a"]), float(p["b"])
    if q >= 1.0 or a <= 0.0:
        return None
    if q <= 0.0:
        return -np.inf
    return float((np.log(q / (1.0 - q)) - b) / a)


# ------------------------------------------------------------------ quality


def reliability(probs: np.ndarray, truth: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the reliability table of ``probs`` vs ``truth``.

    Args:
        probs: predicted probabilities (any shape); NaN entries ignored.
        truth: bool of the same shape.
        bins: equal-width bins over [0, 1].

    Returns:
        ``{"ece": .., "brier": .., "n": .., "bins": [{lo, hi, n, mean_p, frac_pos}]}``
        (ECE: the count-weighted mean of ``|mean_p - frac_pos|`` over bins).
    """
    p = np.asarray(probs, np.float64).reshape(-1)
    t = np.asarray(truth, bool).reshape(-1)
    if p.shape != t.shape:
        raise InputError(f"probs and truth differ in size: {p.shape} vs {t.shape}")
    ok = np.isfinite(p)
    p, t = p[ok], t[ok]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        if not n:
            continue
        mp, fp = float(p[m].mean()), float(t[m].mean())
        ece += n * abs(mp - fp)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                     "mean_p": round(mp, 4), "frac_pos": round(fp, 4)})
    n = len(p)
    return {"ece": ece / n if n else float("nan"),
            "brier": float(np.mean((p - t) ** 2)) if n else float("nan"), "n": n,
            "bins": rows}


def threshold_report(probs: np.ndarray, truth: np.ndarray, threshold: float = 0.5,
                     total_pos: int | None = None) -> dict[str, float]:
    """Precision and recall of keeping results with ``probs >= threshold``.

    ``total_pos``: the number of true matches that exist (recall's denominator;
    default: the true entries of ``truth``, i.e. those among the returned results).
    """
    p = np.asarray(probs, np.float64).reshape(-1)
    t = np.asarray(truth, bool).reshape(-1)
    keep = np.isfinite(p) & (p >= threshold)
    tp = int((keep & t).sum())
    denom = int(t.sum()) if total_pos is None else int(total_pos)
    return {"threshold": float(threshold), "kept": int(keep.sum()), "true_kept": tp,
            "precision": tp / int(keep.sum()) if keep.any() else float("nan"),
            "recall": tp / denom if denom else float("nan")}
