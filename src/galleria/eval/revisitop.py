"""The official revisitop protocol.

(Radenović et al., "Revisiting Oxford and Paris",
CVPR 2018). :func:`compute_ap` and :func:`compute_map` are a faithful port of
``compute_ap`` / ``compute_map`` from ``filipradenovic/revisitop``
(``python/evaluate.py``): trapezoid AP over the precision-recall curve, junk
items removed from the ranking before AP is computed, mean precision at
``kappas`` with the official (quirky) definition, and queries without positives
left out of the mean. The one deliberate difference is the layout: galleria
passes rankings row-major, ``(Q, K)`` — one row per query, best first — where
the official code takes ``(db_size, Q)``; transpose when porting a call.
:func:`revisitop_evaluate` runs the Easy / Medium / Hard settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.eval.ranking import _CHUNK_ELEMENTS, _check_scores, rank_gallery
from galleria.types import SearchResult

DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)

# --------------------------------------------------------------------------- #
# Official revisitop protocol
# --------------------------------------------------------------------------- #


def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Average precision of one query, official revisitop definition (trapezoid rule).

    Args:
        ranks: ``(n,)`` sorted, 0-based positions of the retrieved positives in
            the ranking (after junk removal).
        nres: number of positives of the query (``>= 1``); positives absent from
            ``ranks`` count as never retrieved.

    Returns:
        AP in ``[0, 1]``. E.g. ``compute_ap([0, 2, 5], 3) == 0.677777...``.
    """
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if nres <= 0:
        raise InputError(f"nres must be positive, got {nres}")
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    # precision before (left edge) and after (right edge) the j-th positive
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_0 = np.where(r == 0, 1.0, j / r)
    precision_1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((precision_0 + precision_1) / 2.0) / nres)


def _remove_junk(pos: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Shift sorted positive positions down by the number of junk items ranked before them."""
    if junk.size == 0:
        return pos
    return pos - np.searchsorted(junk, pos, side="left")


def _revisitop_query(
    ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray, kappas: Sequence[int]
) -> tuple[float, np.ndarray]:
    """AP and precision at kappas of one query with non-empty ``ok`` (official rules)."""
    pos = np.flatnonzero(np.isin(ranking, ok))
    jpos = np.flatnonzero(np.isin(ranking, junk)) if junk.size else junk
    pos = _remove_junk(pos, jpos)
    ap = compute_ap(pos, int(ok.size))
    prs = np.zeros(len(kappas))
    if pos.size:  # the official code assumes at least one positive is ranked
        pos1 = pos + 1
        for j, kappa in enumerate(kappas):
            kq = min(int(pos1.max()), int(kappa))
            prs[j] = np.count_nonzero(pos1 <= kq) / kq
    return ap, prs


def _as_index_array(x: Any) -> np.ndarray:
    arr = np.asarray(x if x is not None else [], dtype=np.int64).reshape(-1)
    return arr


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (),
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean AP and mean precision at ``kappas``, official revisitop rules.

    Args:
        ranks: ``(Q, K)`` int gallery indices, best first (``K`` may be smaller
            than the gallery: missing positives count as not retrieved). Note the
            official code takes the transpose ``(K, Q)``.
        gnd: ``Q`` mappings with ``"ok"`` (positive gallery indices) and
            optionally ``"junk"`` (indices removed from the ranking before AP).
        kappas: cut-offs for mean precision, e.g. ``(1, 5, 10)``.

    Returns:
        ``(map, aps, pr, prs)``: mean AP over queries with positives; ``(Q,)``
        APs (NaN for queries without positives); ``(len(kappas),)`` mean
        precision at kappas; ``(Q, len(kappas))`` per-query precision (NaN for
        queries without positives). Precision at kappa follows the official
        definition ``|pos <= kq| / kq`` with ``kq = min(max(pos), kappa)`` (1-based
        positions after junk removal); a query whose positives are all missing
        from a truncated ranking gets 0 (the official code would fail).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise InputError(f"ranks must have shape (Q, K); got {ranks.shape}")
    if ranks.shape[0] != len(gnd):
        raise InputError(f"ranks has {ranks.shape[0]} rows but gnd has {len(gnd)} queries")
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        ok = _as_index_array(gnd[i]["ok"])
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        junk = np.sort(_as_index_array(gnd[i].get("junk")))
        aps[i], prs[i] = _revisitop_query(ranks[i], ok, junk, kappas)
    return _mean_ignoring_empty(aps, prs, kappas)


def _mean_ignoring_empty(
    aps: np.ndarray, prs: np.ndarray, kappas: Sequence[int]
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


_SETTINGS = ("E", "M", "H")


def revisitop_gnd_settings(
    gnd: Sequence[Mapping[str, Any]],
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Turn official ground truth into the Easy / Medium / Hard ``{"ok", "junk"}`` lists.

    ``gnd`` holds per query ``"easy"``, ``"hard"`` and ``"junk"`` gallery indices.
    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy.
    """
    out: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in _SETTINGS}
    for g in gnd:
        easy = _as_index_array(g.get("easy"))
        hard = _as_index_array(g.get("hard"))
        junk = _as_index_array(g.get("junk"))
        out["E"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        out["M"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        out["H"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def revisitop_evaluate(
    ranks_or_scores: np.ndarray | SearchResult,
    gnd: Sequence[Mapping[str, Any]],
    *,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> dict[str, float]:
    """Easy / Medium / Hard mAP and mP@kappas, official revisitop protocol.

    Args:
        ranks_or_scores: either ``(Q, G)`` float similarity scores (higher is
            better; ranked per query, ties by gallery index) or ``(Q, K)``
            integer gallery indices best first (a :class:`SearchResult` from an
            index counts as the latter). The dtype decides which.
        gnd: ``Q`` mappings with ``"easy"``, ``"hard"``, ``"junk"`` gallery
            indices (the ``gnd`` list of ``gnd_roxford5k.pkl``).
        kappas: precision cut-offs.

    Returns:
        Fractions in ``[0, 1]`` keyed ``"E_mAP"``, ``"M_mAP"``, ``"H_mAP"`` and
        ``"E_mP@1"``, ``"M_mP@5"``, ... for each kappa.
    """
    settings = revisitop_gnd_settings(gnd)
    q = len(gnd)
    kappas = tuple(int(k) for k in kappas)
    aps = {s: np.zeros(q) for s in _SETTINGS}
    prs = {s: np.zeros((q, len(kappas))) for s in _SETTINGS}
    prepared = {s: [(g["ok"], np.sort(g["junk"])) for g in settings[s]] for s in _SETTINGS}
    for start, ranking in _iter_rankings(ranks_or_scores, n_queries=q):
        for r, row in enumerate(ranking):
            i = start + r
            for s in _SETTINGS:
                ok, junk = prepared[s][i]
                if ok.size == 0:
                    aps[s][i] = np.nan
                    prs[s][i] = np.nan
                else:
                    aps[s][i], prs[s][i] = _revisitop_query(row, ok, junk, kappas)
    out: dict[str, float] = {}
    mprs: dict[str, np.ndarray] = {}
    for s in _SETTINGS:
        out[f"{s}_mAP"], _, mprs[s], _ = _mean_ignoring_empty(aps[s], prs[s], kappas)
    for s in _SETTINGS:
        for k, v in zip(kappas, mprs[s], strict=True):
            out[f"{s}_mP@{k}"] = float(v)
    return out


def _iter_rankings(x: np.ndarray | SearchResult, *, n_queries: int):
    """Yield ``(first_row, (c, K) ranking)`` chunks from scores or a ranking."""
    arr = x.ids if isinstance(x, SearchResult) else np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] != n_queries:
        raise InputError(
            f"expected a (Q={n_queries}, G) score matrix or (Q, K) ranking; got {arr.shape}"
        )
    if np.issubdtype(arr.dtype, np.integer):
        yield 0, arr
        return
    scores = _check_scores(arr)
    step = max(1, _CHUNK_ELEMENTS // max(1, scores.shape[1]))
    for s in range(0, scores.shape[0], step):
        yield s, rank_gallery(scores[s : s + step])


# --------------------------------------------------------------------------- #
# Rankings from scores
