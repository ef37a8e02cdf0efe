"""Retrieval metrics on labels: pure numpy functions on rankings and score matrices.

Label-based metrics (:func:`per_query_metrics`, :func:`retrieval_metrics`
and thin wrappers). Relevance is "same label"; a query's number of relevant
items ``R`` is counted over the whole gallery (the query itself excluded when
it is a gallery item and ``query_gallery_index`` names it). Metric names:

``"mAP"``
    Standard non-interpolated AP over the full ranking:
    ``AP = (1/R) * sum_i P(i) * rel(i)``; relevant items missing from a
    truncated ranking count as never retrieved.
``"mAP@R"``
    Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020):
    ``(1/R) * sum_{i<=R} P(i) * rel(i)`` — AP restricted to the first ``R``
    ranks.
``"mAP@<k>"`` (e.g. ``"mAP@100"``)
    The Google-Landmarks-v2 definition:
    ``(1/min(R, k)) * sum_{i<=k} P(i) * rel(i)``.
``"R@<k>"``
    Recall@K as used in metric learning = hit rate: 1 if at least one relevant
    item is in the top ``k``, else 0.
``"P@<k>"``
    Precision at ``k``: relevant items in the top ``k``, divided by ``k``.
``"N-S"``
    UKBench score: number of relevant items in the top 4 (0..4). Use it with the
    query left *in* its own ranking (``query_gallery_index=None``), as the
    UKBench protocol counts the query image itself.

Here ``P(i)`` is the precision at rank ``i`` (1-based) and ``rel(i)`` is 1 when
the item at rank ``i`` is relevant. Every value is a fraction (``N-S`` a count),
per query, and a query with ``R = 0`` gets NaN and is left out of the mean, as
in the official revisitop code.

Ties in a score matrix are broken by gallery index (the lower index ranks
first), so results are deterministic. Scores are processed in chunks of
queries, so a 10k x 10k problem stays within a few hundred MB.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.eval.ranking import _CHUNK_ELEMENTS, _check_scores, rank_gallery
from galleria.eval.revisitop import (  # re-exported: metrics is the one place to import from
    DEFAULT_KAPPAS,
    compute_ap,
    compute_map,
    revisitop_evaluate,
    revisitop_gnd_settings,
)
from galleria.types import SearchResult

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KAPPAS", "DEFAULT_METRICS", "compute_ap", "compute_map", "map_at_k", "map_at_r",
    "mean_average_precision", "per_query_metrics", "precision_at_k", "rank_gallery",
    "recall_at_k", "retrieval_metrics", "revisitop_evaluate", "revisitop_gnd_settings",
    "ukbench_ns_score",
]

DEFAULT_METRICS: tuple[str, ...] = ("mAP", "mAP@R", "mAP@100", "R@1", "R@5", "R@10")

_METRIC_RE = re.compile(r"^(mAP|R|P)@(\d+|R)$")


# --------------------------------------------------------------------------- #


def _parse_metric(name: str) -> tuple[str, int | None]:
    """``"mAP"`` -> ("mAP", None); ``"mAP@R"`` -> ("mAP@R", None); ``"R@5"`` -> ("R", 5)."""
    if name in ("mAP", "N-S", "mAP@R"):
        return name, None
    m = _METRIC_RE.match(name)
    if not m or m.group(2) == "R":
        raise InputError(
            f"unknown metric {name!r}; use 'mAP', 'mAP@R', 'mAP@<k>', 'R@<k>', 'P@<k>' or 'N-S'"
        )
    k = int(m.group(2))
    if k < 1:
        raise InputError(f"metric {name!r} needs k >= 1")
    return m.group(1), k


def _encode_labels(query_labels: Any, gallery_labels: Any) -> tuple[np.ndarray, np.ndarray, int]:
    ql = np.asarray(query_labels).reshape(-1)
    gl = np.asarray(gallery_labels).reshape(-1)
    if ql.size == 0 or gl.size == 0:
        raise InputError(f"empty labels: {ql.size} query labels, {gl.size} gallery labels")
    try:
        uniq, codes = np.unique(np.concatenate([ql, gl]), return_inverse=True)
    except TypeError as exc:
        raise InputError(f"labels cannot be compared: {exc}") from exc
    codes = codes.reshape(-1).astype(np.int64)
    return codes[: ql.size], codes[ql.size :], int(uniq.size)


def _check_qgi(qgi: Any, q: int, g: int) -> np.ndarray:
    if qgi is None:
        return np.full(q, -1, dtype=np.int64)
    arr = np.asarray(qgi)
    if arr.shape != (q,) or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(
            f"query_gallery_index must be a ({q},) integer array, got {arr.shape} {arr.dtype}"
        )
    arr = arr.astype(np.int64)
    if ((arr < -1) | (arr >= g)).any():
        raise InputError(f"query_gallery_index values must be -1 or in [0, {g})")
    return arr


def _compact(rel: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Drop the ``~keep`` entries of each row (shifting the rest left), pad with False."""
    rel = rel & keep
    if keep.all():
        return rel
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(rel, order, axis=1)


def per_query_metrics(
    scores_or_ranking: np.ndarray | SearchResult,
    query_labels: Any,
    gallery_labels: Any,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    query_gallery_index: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-query label-based metrics (see the module docstring for definitions).

    Args:
        scores_or_ranking: ``(Q, G)`` float similarity scores, or ``(Q, K)``
            integer gallery indices best first (``-1`` = no result; a
            :class:`SearchResult` from an index counts as the latter). A
            truncated ranking counts relevant items beyond it as not retrieved.
        query_labels: ``(Q,)`` labels (any comparable type).
        gallery_labels: ``(G,)`` labels; an item is relevant to a query when the
            labels are equal.
        metrics: metric names, e.g. ``("mAP", "mAP@R", "mAP@100", "R@1", "N-S")``.
        query_gallery_index: ``(Q,)`` int; ``query_gallery_index[q] = g`` removes
            gallery item ``g`` from query ``q``'s ranking and relevant set (the
            query itself in a leave-one-out / all-vs-all setting); ``-1`` = the
            query is not in the gallery. ``None`` = no exclusion.

    Returns:
        ``{name: (Q,) float64}``; NaN for queries without relevant items.
    """
    qcodes, gcodes, ncodes = _encode_labels(query_labels, gallery_labels)
    q, g = qcodes.size, gcodes.size
    arr = (
        scores_or_ranking.ids
        if isinstance(scores_or_ranking, SearchResult)
        else (np.asarray(scores_or_ranking))
    )
    if arr.ndim != 2 or arr.shape[0] != q:
        raise InputError(
            f"expected a (Q={q}, G={g}) score matrix or a (Q={q}, K) ranking; got {arr.shape}"
        )
    is_ranking = np.issubdtype(arr.dtype, np.integer)
    if is_ranking:
        _check_ranking(arr, g)
    else:
        _check_scores(arr)
        if arr.shape[1] != g:
            raise InputError(f"scores have {arr.shape[1]} columns but there are {g} gallery labels")
    qgi = _check_qgi(query_gallery_index, q, g)
    parsed = [(name, *_parse_metric(name)) for name in dict.fromkeys(metrics)]
    if not parsed:
        raise InputError("no metrics requested")

    # relevant items per query, the query itself excluded
    n_rel = np.bincount(gcodes, minlength=ncodes)[qcodes].astype(np.int64)
    has_self = qgi >= 0
    n_rel[has_self] -= gcodes[qgi[has_self]] == qcodes[has_self]

    members = _members_by_code(gcodes, ncodes)
    out = {name: np.full(q, np.nan) for name, _, _ in parsed}
    step = max(1, _CHUNK_ELEMENTS // arr.shape[1])
    for s in range(0, q, step):
        e = min(q, s + step)
        if is_ranking:
            pos = _positions_from_ranking(arr[s:e], gcodes, qcodes[s:e], qgi[s:e])
        else:
            pos = _positions_from_scores(arr[s:e], members, qcodes[s:e], qgi[s:e], n_rel[s:e])
        _fill_metrics(out, parsed, pos, n_rel[s:e], slice(s, e))
    return out


def _members_by_code(gcodes: np.ndarray, ncodes: int) -> list[np.ndarray]:
    """Gallery indices of each label code, ascending."""
    order = np.argsort(gcodes, kind="stable")
    bounds = np.searchsorted(gcodes[order], np.arange(ncodes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(ncodes)]


# Sentinel position of a relevant item that was not retrieved.
_NOT_RETRIEVED = np.iinfo(np.int64).max // 4


def _positions_from_ranking(
    ranking: np.ndarray, gcodes: np.ndarray, qcodes: np.ndarray, qgi: np.ndarray
) -> np.ndarray:
    """``(c, W)`` sorted 0-based positions of the relevant items in a given ranking.

    The query's own item (``qgi``) and ``-1`` entries are removed first; relevant
    items absent from the ranking are padded with ``_NOT_RETRIEVED``.
    """
    ranking = ranking.astype(np.int64, copy=False)
    valid = ranking >= 0
    rel = valid & (gcodes[np.where(valid, ranking, 0)] == qcodes[:, None])
    keep = ~((qgi[:, None] >= 0) & (ranking == qgi[:, None]))
    rel = _compact(rel, keep)
    hits = rel.sum(axis=1)
    width = max(1, int(hits.max(initial=0)))
    pos = np.full((rel.shape[0], width), _NOT_RETRIEVED, dtype=np.int64)
    rows, cols = np.nonzero(rel)
    slot = np.cumsum(rel, axis=1)[rows, cols] - 1
    pos[rows, slot] = cols
    return pos


def _positions_from_scores(
    scores: np.ndarray,
    members: list[np.ndarray],
    qcodes: np.ndarray,
    qgi: np.ndarray,
    n_rel: np.ndarray,
) -> np.ndarray:
    """``(c, max R)`` sorted 0-based ranks of each query's relevant items in its full ranking.

    Ranking = descending score, ties by ascending gallery index, the query's own
    item removed. Uses one sort of the scores per row (no argsort) and binary
    search, with an exact fallback when a relevant item's score is tied.
    """
    neg = -np.asarray(scores)
    srt = np.sort(neg, axis=1)
    c = neg.shape[0]
    width = max(1, int(n_rel.max(initial=0)))
    pos = np.full((c, width), _NOT_RETRIEVED, dtype=np.int64)
    for r in range(c):
        own = int(qgi[r])
        idx = members[qcodes[r]]
        if own >= 0:
            idx = idx[idx != own]
            idx = np.append(idx, own)  # rank it too, to remove it afterwards
        if idx.size == 0:
            continue
        row = neg[r]
        vals = row[idx]
        p = np.searchsorted(srt[r], vals, side="left")
        tied = np.searchsorted(srt[r], vals, side="right") - p > 1
        if tied.any():
            p = _fix_ties(row, idx, p, tied)
        if own >= 0:
            p_own, p = p[-1], p[:-1]
            p = p - (p > p_own)
        p.sort()
        pos[r, : p.size] = p
    return pos


def _fix_ties(row: np.ndarray, idx: np.ndarray, p: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """Add, for tied items, the number of equal scores at lower gallery indices."""
    t = np.flatnonzero(tied)
    if t.size * row.size > _CHUNK_ELEMENTS:  # many ties: one stable sort of the row
        inv = np.empty(row.size, dtype=np.int64)
        inv[np.argsort(row, kind="stable")] = np.arange(row.size)
        return inv[idx]
    p = p.copy()
    lower = np.arange(row.size)[None, :] < idx[t, None]
    p[t] += np.count_nonzero((row[None, :] == row[idx[t], None]) & lower, axis=1)
    return p


def _check_ranking(ranking: np.ndarray, g: int) -> None:
    if ranking.shape[1] == 0:
        raise InputError("the ranking is empty (0 columns)")
    if ((ranking < -1) | (ranking >= g)).any():
        raise InputError(
            f"ranking values must be gallery indices in [0, {g}) or -1; "
            "pass a float array if these are scores"
        )
    srt = np.sort(ranking, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        raise InputError(
            "the ranking repeats a gallery index within a row; "
            "pass a float array if these are scores"
        )


def _fill_metrics(
    out: dict[str, np.ndarray],
    parsed: list[tuple[str, str, int | None]],
    pos: np.ndarray,
    n_rel: np.ndarray,
    rows: slice,
) -> None:
    """Metrics from ``(c, W)`` sorted positions of the relevant items (0-based)."""
    hit_no = np.arange(1, pos.shape[1] + 1, dtype=np.float64)  # i-th relevant item
    found = pos < _NOT_RETRIEVED
    prec = np.where(found, hit_no / (np.where(found, pos, 0) + 1.0), 0.0)  # P at each hit
    has = n_rel > 0
    r = np.maximum(n_rel, 1).astype(np.float64)

    for name, kind, k in parsed:
        if kind == "mAP" and k is None:
            val = prec.sum(axis=1) / r
        elif kind == "mAP@R":
            val = (prec * (pos < n_rel[:, None])).sum(axis=1) / r
        elif kind == "mAP":
            assert k is not None
            val = (prec * (pos < k)).sum(axis=1) / np.minimum(r, k)
        elif kind == "R":
            val = (pos[:, 0] < k).astype(np.float64)
        elif kind == "P":
            assert k is not None
            val = np.count_nonzero(pos < k, axis=1) / k
        else:  # N-S
            val = np.count_nonzero(pos < 4, axis=1).astype(np.float64)
        out[name][rows] = np.where(has, val, np.nan)


def retrieval_metrics(
    scores_or_ranking: np.ndarray | SearchResult,
    query_labels: Any,
    gallery_labels: Any,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    query_gallery_index: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean of :func:`per_query_metrics` over queries that have relevant items.

    Returns fractions in ``[0, 1]`` (``N-S`` in ``[0, 4]``); NaN when no query
    has a relevant item. Arguments as in :func:`per_query_metrics`.
    """
    per_q = per_query_metrics(
        scores_or_ranking,
        query_labels,
        gallery_labels,
        metrics=metrics,
        query_gallery_index=query_gallery_index,
    )
    out: dict[str, float] = {}
    for name, vals in per_q.items():
        ok = ~np.isnan(vals)
        if not ok.all():
            logger.debug("%s: %d of %d queries have no relevant item", name, (~ok).sum(), ok.size)
        out[name] = float(vals[ok].mean()) if ok.any() else float("nan")
    return out


def _one(name: str, x: Any, ql: Any, gl: Any, qgi: np.ndarray | None) -> float:
    return retrieval_metrics(x, ql, gl, metrics=(name,), query_gallery_index=qgi)[name]


def mean_average_precision(
    scores_or_ranking: np.ndarray | SearchResult,
    query_labels: Any,
    gallery_labels: Any,
    *,
    query_gallery_index: np.ndarray | None = None,
) -> float:
    """mAP over all relevant items (non-interpolated AP), as a fraction."""
    return _one("mAP", scores_or_ranking, query_labels, gallery_labels, query_gallery_index)


def map_at_r(
    scores_or_ranking: np.ndarray | SearchResult,
    query_labels: Any,
    gallery_labels: Any,
    *,
    query_gallery_index: np.ndarray | None = None,
) -> float:
    """mAP@R (Musgrave et al. 2020), as a fraction."""
    return _one("mAP@R", scores_or_ranking, query_labels, gallery_labels, query_gallery_index)


def map_at_k(
    scores_or_ranking: np.ndarray | SearchResult,
    query_labels: Any,
    gallery_labels: Any,
    *,
    k: int = 100,
    query_gallery_index: np.ndarray | None = None,
) -> float:
    """mAP@k normalised by ``min(R, k)`` (GLDv2 definition), as a fraction."""
    return _one(
        f"mAP@{int(k)}", scores_or_ranking, query_labels, gallery_labels, query_gallery_index
    )


def recall_at_k(
    scores_or_ranking: np.ndarray | SearchResult,
    query_labels: Any,
    gallery_labels: Any,
    *,
    k: int,
    query_gallery_index: np.ndarray | None = None,
) -> float:
    """Recall@K = fraction of queries with at least one relevant item in the top ``k``."""
    return _one(f"R@{int(k)}", scores_or_ranking, query_labels, gallery_labels, query_gallery_index)


def precision_at_k(
    scores_or_ranking: np.ndarray | SearchResult,
    query_labels: Any,
    gallery_labels: Any,
    *,
    k: int,
    query_gallery_index: np.ndarray | None = None,
) -> float:
    """Mean precision at ``k`` (relevant items in the top ``k`` over ``k``)."""
    return _one(f"P@{int(k)}", scores_or_ranking, query_labels, gallery_labels, query_gallery_index)


def ukbench_ns_score(scores_or_ranking: np.ndarray | SearchResult, labels: Any) -> float:
    """UKBench N-S score: mean number of the query's group (query included) in the top 4.

    Args:
        scores_or_ranking: ``(N, N)`` all-vs-all scores (or ``(N, K)`` ranking),
            the query left in the gallery.
        labels: ``(N,)`` group ids (4 images per group in UKBench).

    Returns:
        A value in ``[0, 4]``; 4 is perfect.
    """
    return _one("N-S", scores_or_ranking, labels, labels, None)
