"""Merge rules for search during a backfill, score calibration, and backfill metrics.

During an online backfill every gallery item holds a vector of exactly one model:
the *old* part (not yet re-embedded) and the *new* part (backfilled). A query is
answered by searching both parts, each with a query embedding of its own space,
and merging the two ranked lists by score (docs/methods.md, online backfilling, "distance rank
merge"). The query embedding of the old part is either ``old(q)`` (two forward
passes per query) or ``psi(new(q))`` (one pass, see :mod:`galleria.upgrade.psi`).

Raw cosine similarities of two models are not on one scale (one model's typical
nearest-neighbour similarity may be 0.8, the other's 0.6), so a naive merge by
raw score favours one part. A :class:`Calibration` holds one monotone
:class:`ScoreMap` per part ("channel") that brings both onto a common scale
before the merge. Maps are monotone, so each part's own ranking is unchanged:
only the interleaving of the two lists changes. Kinds (all fitted on *paired*
embeddings, i.e. the same reference images embedded by both models):

``identity``
    raw scores (the naive merge).
``affine``
    per-channel z-score ``(s - mean) / std`` of the reference nearest-neighbour
    similarities (top ``k`` per reference image, itself excluded).
``quantile``
    maps the old channel onto the new channel's scale by matching the quantiles
    of the two nearest-neighbour similarity distributions (computed on the same
    reference images, so "the 90th-percentile neighbour similarity" means the
    same in both spaces). Label-free.
``platt``
    per-channel logistic regression of "same label" on the similarity of
    reference neighbour pairs; the merged score is the log-odds of relevance.
    Needs labels.

A second family is *query-adaptive*: :func:`cohort_stats` / :func:`znorm_result`
normalise each query's scores in each part by the mean and standard deviation
of that query's similarities to a reference *cohort* of images embedded in both
spaces (the Z-norm of speaker verification; with ``top`` it is the adaptive
variant, statistics of the query's ``top`` most similar cohort images). It adapts
to queries whose similarities run high or low in one model, which a global map
cannot. The live job's cohort is its (old, new) calibration pairs.

Everything here is a pure numpy function; :class:`Calibration` is a small
JSON-able value object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.types import SearchResult, merge_top
from galleria.validate import as_embeddings

CHANNELS = ("old", "new")
MAP_KINDS = ("identity", "affine", "quantile", "platt")
CALIBRATION_KINDS = ("identity", "affine", "quantile", "platt")

# quantile levels: uniform in the body, dense in the upper tail where neighbours live
_LEVELS = np.unique(
    np.concatenate([np.linspace(0.0, 0.9, 91), 1.0 - np.geomspace(0.1, 1e-4, 60), [1.0]])
)


# --------------------------------------------------------------------------- #
# Score maps
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ScoreMap:
    """A monotone non-decreasing map of raw similarities of one channel.

    Attributes:
        kind: one of :data:`MAP_KINDS`.
        params: JSON-able parameters: ``affine``: ``{"mean", "std"}``;
            ``quantile``: ``{"x": [...], "y": [...]}`` (piecewise-linear, linear
            extrapolation with the end slopes); ``platt``: ``{"a", "b"}``.
    """

    kind: str = "identity"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise InputError(f"unknown score map {self.kind!r}; known: {MAP_KINDS}")

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Map an array of raw scores (any shape); ``-inf`` (missing) stays ``-inf``."""
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "identity":
            out = s
        elif self.kind == "affine":
            out = (s - float(self.params["mean"])) / float(self.params["std"])
        elif self.kind == "platt":
            out = float(self.params["a"]) * s + float(self.params["b"])
        else:
            x = np.asarray(self.params["x"], dtype=np.float64)
            y = np.asarray(self.params["y"], dtype=np.float64)
            out = np.interp(s, x, y)
            lo, hi = s < x[0], s > x[-1]
            if lo.any():
                out[lo] = y[0] + (s[lo] - x[0]) * _slope(x[:2], y[:2])
            if hi.any():
                out[hi] = y[-1] + (s[hi] - x[-1]) * _slope(x[-2:], y[-2:])
        out = np.where(np.isneginf(s), -np.inf, out)
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScoreMap:
        return cls(str(d.get("kind", "identity")), dict(d.get("params") or {}))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    dx = float(x[1] - x[0])
    return float(y[1] - y[0]) / dx if dx > 1e-12 else 1.0


@dataclass(frozen=True)
class Calibration:
    """One :class:`ScoreMap` per channel (``"old"``, ``"new"``) plus how it was fitted."""

    old: ScoreMap = field(default_factory=ScoreMap)
    new: ScoreMap = field(default_factory=ScoreMap)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.info.get("kind", self.old.kind))

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old.to_dict(), "new": self.new.to_dict(), "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        return cls(
            ScoreMap.from_dict(d.get("old") or {}),
            ScoreMap.from_dict(d.get("new") or {}),
            dict(d.get("info") or {}),
        )

    @classmethod
    def identity(cls) -> Calibration:
        return cls(info={"kind": "identity"})


# --------------------------------------------------------------------------- #
# Fitting calibrations on paired reference embeddings
# --------------------------------------------------------------------------- #


def knn_similarities(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    self_index: np.ndarray | None = None,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of each query row against the gallery rows.

    Args:
        queries: ``(N, D)`` query-side embeddings.
        gallery: ``(M, D)`` gallery-side embeddings.
        k: neighbours per query (clipped to what the gallery holds).
        self_index: ``(N,)`` int, the gallery row that is the query's own image
            (skipped), ``-1`` for none; ``None`` = no exclusion.

    Returns:
        ``(N, k)`` similarities (descending) and ``(N, k)`` int64 gallery indices.
    """
    q = as_embeddings(queries, name="queries")
    g = as_embeddings(gallery, name="gallery", dim=q.shape[1])
    own = None
    if self_index is not None:
        own = np.asarray(self_index, dtype=np.int64).reshape(-1)
        if own.shape[0] != q.shape[0] or (own >= g.shape[0]).any():
            raise InputError(f"self_index must be ({q.shape[0]},) rows of the gallery or -1")
    k = max(1, min(int(k), g.shape[0] - (1 if own is not None else 0)))
    sims = np.empty((q.shape[0], k), np.float32)
    idx = np.empty((q.shape[0], k), np.int64)
    for s in range(0, q.shape[0], chunk):
        e = min(q.shape[0], s + chunk)
        sc = q[s:e] @ g.T
        if own is not None:
            rows = np.flatnonzero(own[s:e] >= 0)
            sc[rows, own[s:e][rows]] = -np.inf
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(sc, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        sims[s:e] = np.take_along_axis(vals, order, axis=1)
        idx[s:e] = np.take_along_axis(part, order, axis=1)
    return sims, idx


def fit_affine(scores: np.ndarray) -> ScoreMap:
    """z-score map from a sample of scores (e.g. reference neighbour similarities)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size < 2:
        raise InputError("fit_affine needs at least 2 finite scores")
    return ScoreMap("affine", {"mean": float(s.mean()), "std": float(max(s.std(), 1e-6))})


def fit_quantile(source: np.ndarray, target: np.ndarray) -> ScoreMap:
    """Map ``source``-channel scores onto the ``target`` channel's scale (quantile matching).

    Both are samples of the same kind of score (e.g. the top-``k`` neighbour
    similarities of the same reference images in each space). The map is
    piecewise linear through matched quantiles, strictly increasing.
    """
    src = np.asarray(source, dtype=np.float64).reshape(-1)
    tgt = np.asarray(target, dtype=np.float64).reshape(-1)
    src, tgt = src[np.isfinite(src)], tgt[np.isfinite(tgt)]
    if src.size < 2 or tgt.size < 2:
        raise InputError("fit_quantile needs at least 2 finite scores per channel")
    x = np.quantile(src, _LEVELS)
    y = np.quantile(tgt, _LEVELS)
    # strictly increasing knots (ties in x would make the interpolation ambiguous)
    keep = np.concatenate([[True], np.diff(x) > 1e-7])
    x, y = x[keep], np.maximum.accumulate(y[keep])
    if x.size < 2:
        raise InputError("fit_quantile: the source scores are (nearly) constant")
    return ScoreMap("quantile", {"x": x.tolist(), "y": y.tolist()})


def fit_platt(scores: np.ndarray, relevant: np.ndarray, *, iters: int = 100) -> ScoreMap:
    """Logistic regression ``P(relevant | s) = sigmoid(a s + b)`` by Newton's method.

    Args:
        scores: ``(n,)`` similarities of reference pairs.
        relevant: ``(n,)`` bool, whether each pair is relevant (same label).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(relevant, dtype=np.float64).reshape(-1)
    if s.shape != y.shape or s.size < 2:
        raise InputError("fit_platt needs (n,) scores and (n,) relevance, n >= 2")
    if y.min() == y.max():
        raise InputError("fit_platt needs both relevant and irrelevant pairs")
    # Platt's smoothed targets avoid infinite weights on separable data
    n_pos, n_neg = y.sum(), y.size - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    X = np.stack([s, np.ones_like(s)], axis=1)
    w = np.array([1.0, 0.0])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - t)
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    a, b = float(w[0]), float(w[1])
    if a <= 0:
        raise InputError("fit_platt: similarity is not predictive of relevance (slope <= 0)")
    return ScoreMap("platt", {"a": a, "b": b})


def fit_calibration(
    kind: str,
    *,
    old_queries: np.ndarray,
    old_gallery: np.ndarray,
    new_embeddings: np.ndarray,
    labels: np.ndarray | None = None,
    k: int = 10,
    query_rows: np.ndarray | None = None,
) -> Calibration:
    """Fit a :class:`Calibration` from paired reference embeddings of ``N`` images.

    Args:
        kind: ``identity``, ``affine``, ``quantile`` or ``platt``.
        old_queries: ``(N, D_old)`` query-side embeddings of the old channel:
            ``old(x)`` for the two-model rank merge, ``psi(new(x))`` for psi.
        old_gallery: ``(N, D_old)`` ``old(x)`` of the same images.
        new_embeddings: ``(N, D_new)`` ``new(x)`` of the same images.
        labels: ``(N,)`` labels (``platt`` only).
        k: reference neighbours per query image (its own image excluded).
        query_rows: rows used as queries (default all); every row is gallery.
            Pass held-out rows when ``old_queries`` comes from a map trained on
            the others.
    """
    if kind not in CALIBRATION_KINDS:
        raise InputError(f"unknown calibration {kind!r}; known: {CALIBRATION_KINDS}")
    oq = as_embeddings(old_queries, name="old_queries")
    og = as_embeddings(old_gallery, name="old_gallery", dim=oq.shape[1])
    nn = as_embeddings(new_embeddings, name="new_embeddings")
    if not oq.shape[0] == og.shape[0] == nn.shape[0]:
        raise InputError(
            f"paired embeddings need the same N: {oq.shape[0]}, {og.shape[0]}, {nn.shape[0]}"
        )
    if oq.shape[0] < 3:
        raise InputError(f"a calibration needs at least 3 paired images, got {oq.shape[0]}")
    rows = (
        np.arange(oq.shape[0]) if query_rows is None else np.asarray(query_rows, np.int64)
    )
    info = {"kind": kind, "n": int(oq.shape[0]), "queries": int(rows.size), "k": int(k)}
    if kind == "identity":
        return Calibration(info=info)
    s_old, i_old = knn_similarities(oq[rows], og, k, self_index=rows)
    s_new, i_new = knn_similarities(nn[rows], nn, k, self_index=rows)
    if kind == "affine":
        return Calibration(fit_affine(s_old), fit_affine(s_new), info)
    if kind == "quantile":
        return Calibration(fit_quantile(s_old, s_new), ScoreMap(), info)
    if labels is None:
        raise InputError("a platt calibration needs labels")
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != oq.shape[0]:
        raise InputError(f"{lab.shape[0]} labels for {oq.shape[0]} images")
    rel_old = lab[i_old] == lab[rows][:, None]
    rel_new = lab[i_new] == lab[rows][:, None]
    return Calibration(fit_platt(s_old, rel_old), fit_platt(s_new, rel_new), info)


def cohort_stats(
    queries: np.ndarray, cohort: np.ndarray, *, top: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query mean and std of the similarities to a cohort (query-adaptive Z-norm).

    Args:
        queries: ``(Q, D)`` query embeddings of one channel.
        cohort: ``(C, D)`` the cohort's vectors in the same space.
        top: use only each query's ``top`` highest cohort similarities
            (adaptive Z-norm); ``None`` = the whole cohort.

    Returns:
        ``(Q, 1)`` means and ``(Q, 1)`` standard deviations (floored at 1e-6).
    """
    q = as_embeddings(queries, name="queries")
    c = as_embeddings(cohort, name="cohort", dim=q.shape[1])
    if c.shape[0] < 2:
        raise InputError(f"a cohort needs at least 2 items, got {c.shape[0]}")
    s = q @ c.T
    if top is not None and 1 < top < s.shape[1]:
        s = -np.partition(-s, top - 1, axis=1)[:, :top]
    return (s.mean(axis=1, keepdims=True).astype(np.float32),
            np.maximum(s.std(axis=1, keepdims=True), 1e-6).astype(np.float32))


def znorm_scores(scores: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(scores - mean) / std`` per query row (``(Q, K)`` with ``(Q, 1)`` stats); -inf kept."""
    s = np.asarray(scores, dtype=np.float32)
    out = (s - mean) / std
    return np.where(np.isneginf(s), -np.inf, out).astype(np.float32)


def znorm_result(result: SearchResult, mean: np.ndarray, std: np.ndarray) -> SearchResult:
    """A part's result with Z-normed scores (order unchanged: the map is increasing)."""
    return SearchResult(znorm_scores(result.scores, mean, std), result.ids)


@dataclass(frozen=True)
class CohortNorm:
    """Query-adaptive Z-norm of both parts against one cohort embedded in both spaces.

    Attributes:
        old_cohort: ``(C, D_old)`` old-space vectors of the cohort images.
        new_cohort: ``(C, D_new)`` new-space vectors of the same images.
        top: adaptive variant: statistics of each query's ``top`` most similar
            cohort images (``None`` = whole cohort).
    """

    old_cohort: np.ndarray
    new_cohort: np.ndarray
    top: int | None = 100

    @property
    def info(self) -> dict[str, Any]:
        kind = "znorm" if self.top is None else f"znorm-top{self.top}"
        return {"kind": kind, "cohort": int(self.old_cohort.shape[0])}

    def apply(
        self,
        old_part: SearchResult,
        new_part: SearchResult,
        old_queries: np.ndarray,
        new_queries: np.ndarray,
    ) -> tuple[SearchResult, SearchResult]:
        """Z-norm each part's scores with its channel's per-query cohort statistics."""
        mo, so = cohort_stats(old_queries, self.old_cohort, top=self.top)
        mn, sn = cohort_stats(new_queries, self.new_cohort, top=self.top)
        return znorm_result(old_part, mo, so), znorm_result(new_part, mn, sn)


# --------------------------------------------------------------------------- #
# Merging
# --------------------------------------------------------------------------- #


def merge_results(
    parts: Sequence[SearchResult],
    k: int,
    *,
    maps: Sequence[ScoreMap | None] | None = None,
) -> SearchResult:
    """Merge per-part top lists of the same queries into one top-``k`` list by mapped score.

    Args:
        parts: results of the same ``Q`` queries, one per gallery part (e.g. old
            part, new part); ids string (object, ``None`` = missing) or int64
            keys (``-1`` = missing), all of one kind.
        k: length of the merged lists.
        maps: one :class:`ScoreMap` (or ``None`` = identity) per part.

    Returns:
        ``(Q, k)`` :class:`SearchResult` whose scores are the *mapped* scores,
        best first; ties keep part order then rank; an id present in several
        parts is kept once, at its best score; padding as in the inputs.
    """
    if not parts:
        raise InputError("merge_results needs at least one part")
    if k <= 0:
        raise InputError(f"k must be positive, got {k}")
    maps = list(maps) if maps is not None else [None] * len(parts)
    if len(maps) != len(parts):
        raise InputError(f"{len(parts)} parts but {len(maps)} score maps")
    q = len(parts[0])
    if any(len(p) != q for p in parts):
        raise InputError(f"parts have different numbers of queries: {[len(p) for p in parts]}")
    mapped = [SearchResult((m or ScoreMap())(p.scores).astype(np.float32), p.ids)
              for p, m in zip(parts, maps, strict=True)]
    return merge_top(mapped, k, unique=True)


def merged_scores(
    old_scores: np.ndarray,
    new_scores: np.ndarray,
    backfilled: np.ndarray,
    calibration: Calibration | CohortNorm | None = None,
    *,
    old_queries: np.ndarray | None = None,
    new_queries: np.ndarray | None = None,
) -> np.ndarray:
    """Full ``(Q, G)`` merged score matrix of a partly backfilled gallery.

    Args:
        old_scores: ``(Q, G)`` similarities of the old-channel queries to the
            old vectors of every item.
        new_scores: ``(Q, G)`` similarities of the new queries to the new vectors.
        backfilled: ``(G,)`` bool, items already in the new space.
        calibration: global maps of both channels, or a :class:`CohortNorm`
            (then ``old_queries`` / ``new_queries``, the ``(Q, D)`` query
            embeddings of each channel, are needed); identity when ``None``.

    Ranking this matrix equals :func:`merge_results` of the two parts' full
    lists (the reference the simulation benchmark and the tests rely on).
    """
    mask = np.asarray(backfilled, dtype=bool)
    if old_scores.shape != new_scores.shape or mask.shape != (old_scores.shape[1],):
        raise InputError(
            f"merged_scores needs (Q, G) score matrices and a (G,) mask; got "
            f"{old_scores.shape}, {new_scores.shape}, {mask.shape}"
        )
    if isinstance(calibration, CohortNorm):
        if old_queries is None or new_queries is None:
            raise InputError("a cohort normalisation needs the query embeddings of both channels")
        c = calibration
        mo, so = cohort_stats(old_queries, c.old_cohort, top=c.top)
        mn, sn = cohort_stats(new_queries, c.new_cohort, top=c.top)
        return np.where(mask[None, :], znorm_scores(new_scores, mn, sn),
                        znorm_scores(old_scores, mo, so)).astype(np.float32)
    cal = calibration or Calibration.identity()
    return np.where(mask[None, :], cal.new(new_scores), cal.old(old_scores)).astype(np.float32)


# --------------------------------------------------------------------------- #
# Backfill metrics
# --------------------------------------------------------------------------- #


def negative_flip_rate(reference_correct: np.ndarray, correct: np.ndarray) -> float:
    """Share of queries right under the reference (old model) but wrong now.

    ``mean(reference_correct & ~correct)`` over all queries (Yan et al. 2021,
    "Positive-congruent training"), with "right" = the top-1 result is relevant.
    """
    ref = np.asarray(reference_correct, dtype=bool)
    cur = np.asarray(correct, dtype=bool)
    if ref.shape != cur.shape or ref.ndim != 1 or ref.size == 0:
        raise InputError(f"need two (Q,) bool arrays of one shape, got {ref.shape}, {cur.shape}")
    return float(np.mean(ref & ~cur))


def area_under_curve(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area of ``values`` over backfilled ``fractions`` in ``[0, 1]`` (mean height)."""
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if f.shape != v.shape or f.ndim != 1 or f.size < 2:
        raise InputError("area_under_curve needs two (n,) arrays, n >= 2")
    if np.any(np.diff(f) <= 0):
        raise InputError("fractions must be strictly increasing")
    span = f[-1] - f[0]
    return float(np.sum((v[1:] + v[:-1]) * np.diff(f)) / 2.0 / span)


def linear_area(start: float, end: float) -> float:
    """Mean height of the straight line from ``start`` (0 %) to ``end`` (100 %)."""
    return (float(start) + float(end)) / 2.0
