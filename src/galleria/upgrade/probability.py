"""Match probabilities during an upgrade: the tuner's calibration, fitted at each check.

A gallery's tuned calibration (:mod:`galleria.tune.record`) describes the
pipelines of the gallery as it was tuned; it does not describe a backfill
searcher, whose scores merge two models' lists (Z-normed or raw). The job's
pseudo-query check (:mod:`galleria.upgrade.online`) already searches ~500 views
of the gallery's own images with every label-free rule at each check; this
module fits, on those same answers, the tuner's monotone map score -> P(match)
(:func:`galleria.calibration.fit`, isotonic, on the top :data:`DEPTH`
results: the view's source item is the positive, the other results negatives),
one per rule checked, and records them with the decision (one settings write,
atomic with the rule it is published with)::

    {"type": "backfill-match-probability", "format_version": 1,
     "served": "rank-merge", "depth": 10, "method": "isotonic",
     "old_space": "<fp>", "new_space": "<fp>", "job_started": 1764...,
     "moved": 250, "items": 500, "fraction": 0.5,
     "generations": {"<old fp>": 12, "<new fp>": 7},
     "pseudo": "<pseudo-query set fingerprint>", "queries": 500,
     "rules": {"rank-merge": {"calibration": {...calibrate.fit()...},
                              "normalization": "znorm-top100", "map": null}, ...}}

:func:`lookup` returns a rule's calibration only for the searcher it describes
(same job and model fingerprints, same rule, same psi map, same score
normalisation) and only while the gallery is near the state it was fitted on
(at most :data:`STALE_MOVED` of the gallery moved since; the job checks again
every ``OnlineConfig.recheck_every``). Anything else is refused (``None`` and a
reason): answers then carry ``probability: null``, never a probability of
another scale.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from galleria import calibration as calibrate
from galleria.errors import InputError
from galleria.types import SearchResult

if TYPE_CHECKING:
    from galleria.store.gallery import Gallery
    from galleria.upgrade.state import UpgradeState

log = logging.getLogger(__name__)

PROBABILITY_TYPE = "backfill-match-probability"
FORMAT_VERSION = 1
DEPTH = 10
"""Results per pseudo-query the calibration is fitted on (the tuner's ``k``)."""
STALE_MOVED = 0.10
"""Fraction of the gallery moved since the fit past which a calibration is refused."""
METHOD = "isotonic"


def normalization_name(calibration: Any) -> str:
    """The score normalisation a backfill searcher uses (``znorm-top100``, ``identity``...)."""
    info = getattr(calibration, "info", None) or {}
    return str(info.get("kind", "identity"))


def fit_rules(results: Mapping[str, SearchResult], truth_ids: Sequence[str], *,
              normalizations: Mapping[str, str], maps: Mapping[str, str | None],
              depth: int = DEPTH) -> dict[str, dict[str, Any]]:
    """One calibration per rule from its answers to the pseudo-queries.

    Args:
        results: rule -> ``(P, K)`` result of the check (``K >= depth`` or less).
        truth_ids: ``(P,)`` the source item of each pseudo-query.
        normalizations: rule -> :func:`normalization_name` of the searcher that answered.
        maps: rule -> fingerprint of the psi map it used (``None``: none).
        depth: top results per query used (positives: the source item).

    Returns:
        ``{rule: {"calibration", "normalization", "map"}}`` (rules without both a
        positive and a negative in their top ``depth`` are left out, logged).
    """
    want = np.asarray(list(truth_ids), dtype=object)[:, None]
    out: dict[str, dict[str, Any]] = {}
    for rule, res in results.items():
        top = res.head(min(depth, res.k))
        if len(top) != len(want):
            raise InputError(f"rule {rule!r}: {len(top)} result rows for {len(want)} queries")
        truth = top.ids == want
        try:
            cal = calibrate.fit(top.scores, truth, method=METHOD)
        except InputError as exc:  # no positive (or no negative) among the answers
            log.info("no match probabilities for rule %s: %s", rule, exc)
            continue
        out[rule] = {"calibration": cal, "normalization": normalizations.get(rule, "identity"),
                     "map": maps.get(rule)}
    return out


def make_record(rules: dict[str, dict[str, Any]], *, served: str, job: Mapping[str, Any],
                moved: int, items: int, generations: Mapping[str, int], pseudo: str,
                queries: int, depth: int = DEPTH) -> dict[str, Any]:
    """The record published with a decision (see the module docstring); ``job``: the
    job it belongs to, ``{"old_space", "new_space", "job_started"}``."""
    return {"type": PROBABILITY_TYPE, "format_version": FORMAT_VERSION, "served": served,
            "depth": int(depth), "method": METHOD, "old_space": str(job["old_space"]),
            "new_space": str(job["new_space"]), "job_started": float(job["job_started"]),
            "moved": int(moved),
            "items": int(items), "fraction": round(moved / max(items, 1), 4),
            "generations": {str(k): int(v) for k, v in generations.items()},
            "pseudo": pseudo, "queries": int(queries), "rules": rules}


def lookup(record: Any, *, rule: str, old_space: str, new_space: str, job_started: float,
           map_fingerprint: str | None, normalization: str, moved: int, items: int,
           stale_moved: float = STALE_MOVED) -> tuple[dict[str, Any] | None, str]:
    """The calibration of ``rule`` for a searcher in this state, or ``(None, why)``.

    Args:
        record: the decision's ``probability`` record (any JSON value).
        rule: the rule the searcher answers with.
        old_space, new_space, job_started: the job the searcher belongs to.
        map_fingerprint: the psi map the searcher uses (``None``: none).
        normalization: :func:`normalization_name` of the searcher's score normalisation.
        moved, items: items in the new space now, items in the gallery now.
        stale_moved: refuse when ``|moved - record moved| > stale_moved * items``.
    """
    if not isinstance(record, dict) or record.get("type") != PROBABILITY_TYPE:
        return None, "no calibration published by the job yet"
    if record.get("format_version") != FORMAT_VERSION:
        return None, f"calibration format {record.get('format_version')} (reads {FORMAT_VERSION})"
    if (record.get("old_space"), record.get("new_space")) != (old_space, new_space) \
            or float(record.get("job_started", -1.0)) != float(job_started):
        return None, "fitted for another job or other models"
    entry = (record.get("rules") or {}).get(rule)
    if not isinstance(entry, dict) or not entry.get("calibration"):
        return None, f"rule {rule} was not calibrated at the last check"
    if entry.get("map") != map_fingerprint:
        return None, f"fitted with psi {entry.get('map')}, the searcher uses {map_fingerprint}"
    if entry.get("normalization") != normalization:
        return None, (f"fitted on {entry.get('normalization')} scores, the searcher uses "
                      f"{normalization}")
    then = int(record.get("moved", -1))
    if then < 0 or abs(int(moved) - then) > stale_moved * max(int(items), 1):
        return None, f"fitted at {then} moved items, {moved} now: wait for the next check"
    return dict(entry["calibration"]), ""


def probability_record(gallery: Gallery, state: UpgradeState, pseudo: Any,
                       answers: Mapping[str, Any], served: str) -> dict[str, Any]:
    """The match-probability record of the rules a check searched (``answers``: rule ->
    ``(result, searcher)``; ``pseudo``: the check's :class:`~galleria.upgrade.online.PseudoSet`)."""
    results = {r: res for r, (res, _) in answers.items()}
    norms = {r: normalization_name(s.calibration) for r, (_, s) in answers.items()}
    maps = {r: s.map_fingerprint for r, (_, s) in answers.items()}
    gens: dict[str, int] = {}
    for res in results.values():  # a backfill result's generation: one per space
        if isinstance(res.generation, dict):
            gens.update(res.generation)
    return make_record(fit_rules(results, pseudo.ids, normalizations=norms, maps=maps),
                       served=served, job={"old_space": state.old_space,
                                           "new_space": state.new_space,
                                           "job_started": state.started},
                       moved=gallery.count(state.new_space),
                       items=len(gallery), generations=gens, pseudo=pseudo.fingerprint,
                       queries=len(pseudo.ids))
