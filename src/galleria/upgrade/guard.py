"""The old-answers guard's decision, from per-query reciprocal ranks (pure functions).

Every check of a live change (:mod:`galleria.upgrade.online` for models, fused
models and transforms, :mod:`galleria.upgrade.local_guard` for local features)
searches its pseudo-queries with each candidate rule and with the gallery's
old answers, turns each answer list into the reciprocal rank of the view's
source item (:func:`reciprocal_ranks`) and decides here: a candidate replaces
the baseline, and the old answers, only when the one-sided 95 % lower bound of
its mean paired gain is above zero (:func:`decide`, :func:`decide_with_old`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.images.pseudo import rank_of_truth
from galleria.types import SearchResult

BASELINE = "rank-merge"
Z_ONE_SIDED_95 = 1.645
OLD_ONLY = "old-only"
GUARD_MODES = ("until-better", "unless-worse", "off")


def reciprocal_ranks(result: SearchResult, truth: Sequence[str]) -> np.ndarray:
    """``(P,)`` 1 / (1 + rank) of each pseudo-query's source item; 0 when not in the result."""
    r = rank_of_truth(result, truth)
    return np.where(r >= 0, 1.0 / (1.0 + np.maximum(r, 0)), 0.0)


def decide(rr: Mapping[str, np.ndarray], *, baseline: str = BASELINE) -> tuple[str, dict[str, Any]]:
    """The rule to search with, from per-query reciprocal ranks of each candidate.

    A candidate replaces ``baseline`` only when the one-sided 95 % lower bound of
    its mean paired gain over the baseline is above zero; among those, the
    largest mean gain wins.

    Returns:
        ``(rule, {rule: {"mrr", "gain", "lower"}})`` (MRR and gains in %).
    """
    if baseline not in rr:
        raise InputError(f"the decision needs the baseline {baseline!r}")
    base = np.asarray(rr[baseline], dtype=np.float64)
    out: dict[str, Any] = {}
    best, best_gain = baseline, 0.0
    for rule, v in rr.items():
        v = np.asarray(v, dtype=np.float64)
        if v.shape != base.shape:
            raise InputError(f"rule {rule!r}: {v.shape} ranks, baseline {base.shape}")
        d = v - base
        n = max(d.size, 1)
        gain = float(d.mean()) if d.size else 0.0
        se = float(d.std(ddof=1)) / np.sqrt(n) if d.size > 1 else float("inf")
        lower = gain - Z_ONE_SIDED_95 * se
        out[rule] = {"mrr": round(100 * float(v.mean()), 3), "gain": round(100 * gain, 3),
                     "lower": round(100 * lower, 3)}
        if rule != baseline and lower > 0 and gain > best_gain:
            best, best_gain = rule, gain
    return best, out


def decide_with_old(rr: Mapping[str, np.ndarray], *, mode: str = "until-better",
                    baseline: str = BASELINE) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """:func:`decide` among the merge rules, then the old model's answers as a guard.

    ``rr`` may hold :data:`OLD_ONLY`: the pseudo-queries answered by the old model
    alone on the whole gallery (the job keeps the old vectors of moved items in its
    pairs, so search can still give exactly the old answers). The best merge rule
    ``m`` is chosen by :func:`decide`; then

    - ``until-better``: serve ``m`` only when the one-sided 95 % lower bound of its
      paired gain over old-only is above zero (old answers until a merge rule beats
      them);
    - ``unless-worse``: serve ``m`` unless old-only beats it by that bound;
    - ``off``: ignore old-only.

    Returns:
        ``(rule, scores, verdict)``: ``scores`` as :func:`decide` (with old-only);
        ``verdict["merged_vs_old"]`` is ``better`` / ``worse`` / ``same``: whether
        the check finds the best merge rule better than, worse than or not
        distinguishable from the old model's answers (``{}`` without old-only).
    """
    if mode not in GUARD_MODES:
        raise InputError(f"unknown guard mode {mode!r}; known: {', '.join(GUARD_MODES)}")
    mixed_rr = {k: v for k, v in rr.items() if k != OLD_ONLY}
    rule, scores = decide(mixed_rr, baseline=baseline)
    if OLD_ONLY not in rr or mode == "off":
        return rule, scores, {}
    old = np.asarray(rr[OLD_ONLY], dtype=np.float64)
    d = np.asarray(mixed_rr[rule], dtype=np.float64) - old
    if d.shape != old.shape:
        raise InputError(f"old-only: {old.shape} ranks, {rule} {d.shape}")
    gain = float(d.mean()) if d.size else 0.0
    se = float(d.std(ddof=1)) / np.sqrt(d.size) if d.size > 1 else float("inf")
    lower, upper = gain - Z_ONE_SIDED_95 * se, gain + Z_ONE_SIDED_95 * se
    scores = {**scores, OLD_ONLY: {"mrr": round(100 * float(old.mean()), 3),
                                   "gain": round(-100 * gain, 3), "lower": round(-100 * upper, 3)}}
    verdict = {"merged_vs_old": "better" if lower > 0 else "worse" if upper < 0 else "same",
               "merge_rule": rule, "gain": round(100 * gain, 3), "n": int(d.size)}
    if mode == "until-better":
        return (rule if lower > 0 else OLD_ONLY), scores, verdict
    return (OLD_ONLY if upper < 0 else rule), scores, verdict
