"""The tuned record a gallery stores (setting ``"tuned"``): schema, staleness, probabilities.

This module only reads records (no search, no decision), so the decision
(:func:`galleria.decision.choose`) and the service can import it without cycles.
:mod:`galleria.tune.tuner` writes them.

Schema (format version 1; JSON)::

    {
      "type": "galleria-tuned", "format_version": 1,
      "pipeline": "local",              # the default pipeline chosen
      "params": {},                     # its parameters (open_searcher(**params))
      "key": "local",                   # the chosen candidate's key
      "reason": "...",                  # why, in one sentence
      "seed": 0, "n": 200, "k": 10,     # pseudo-queries: seed, sampled items, depth scored
      "views": 1, "queries": 200,       # views per item, pseudo-queries actually scored
      "skipped": 0,                     # sampled items whose image could not be read
      "augment": {...},                 # the phone-view parameters
      "pseudo_fingerprint": "...",      # identifies the pseudo-query set
      "rule": {"margin": 5.0, "global_margin": 15.0, "order": [...]},  # selection rule
      "state": {"items": 500, "primary": "<space>",
                "spaces": [{"space": "<fp>", "kind": "global", "count": 500,
                            "generation": 3}, ...]},
      "candidates": [                   # every candidate, in preference order
        {"key": "global", "pipeline": "global", "params": {}, "supported": true,
         "r1": 91.5, "r5": 97.0, "r10": 98.0, "mrr": 94.1, "n": 200, "blank": 0,
         "search_ms": 1.2, "embed_ms": 35.0, "ms_per_query": 36.2,
         "spaces": ["<fp>"],
         "calibration": {...calibrate.fit() output...}},
        {"key": "local+mds", "pipeline": "local+mds", "params": {...},
         "supported": false, "error": "..."},
      ],
      "seconds": 41.3, "created": "2026-...Z", "galleria": "0.1.0"
    }

Scores in candidates are percentages over the pseudo-queries (``r1``: the true
item first; ``mrr``: mean reciprocal rank within the top ``k``); ``ms_per_query``
is the measured query cost (embedding of the query in every space the pipeline
reads + search), for information: the choice uses ranks only, so it is
deterministic for a seed.

A record is **stale** (:func:`stale_reasons`) when the gallery's spaces differ
from the ones it was tuned at, or when a space's item count has changed by more
than :data:`STALE_GROWTH` (relative) since: the best pipeline depends on the
gallery's content and size. A stale record still names a pipeline that works;
``galleria info`` flags it and ``galleria tune`` refreshes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from galleria.calibration import apply
from galleria.decision.choose import TUNED_KEY  # the setting the decision reads
from galleria.types import SearchResult

log = logging.getLogger(__name__)

RECORD_TYPE = "galleria-tuned"
FORMAT_VERSION = 1
PROB_DECIMALS = 4
"""Decimals of the probabilities in answers (JSON, HTML, UI)."""
STALE_GROWTH = 0.25
"""Relative change of a space's item count past which a tuned record is stale."""


def candidate_key(pipeline: str, params: Mapping[str, Any] | None = None) -> str:
    """``local+mds`` or ``local+mds(blend=0.19,k=100)``: one candidate's key."""
    if not params:
        return pipeline
    inner = ",".join(f"{k}={params[k]}" for k in sorted(params))
    return f"{pipeline}({inner})"


def state_summary(state: Any) -> dict[str, Any]:
    """What a record keeps of a :class:`~galleria.store.state.GalleryState`."""
    spaces = [{"space": s.space, "kind": s.kind, "count": int(s.count),
               "generation": int(s.generation)} for s in state.spaces if s.count]
    items = max((s["count"] for s in spaces), default=0)
    return {"items": items, "primary": state.primary, "spaces": spaces}


def stale_reasons(record: Any, state: Any, *, growth: float = STALE_GROWTH) -> list[str]:
    """Why ``record`` no longer describes the gallery in ``state`` (``[]``: it still does).

    Args:
        record: the ``tuned`` setting (any JSON value; ``None``: never tuned).
        state: a :class:`~galleria.store.state.GalleryState` (or anything with
            ``spaces`` of ``space``/``kind``/``count``).
        growth: relative change of a space's count that makes the record stale.
    """
    if record is None:
        return ["never tuned"]
    if not isinstance(record, dict) or record.get("type") != RECORD_TYPE:
        return ["not a tuned record"]
    if record.get("format_version") != FORMAT_VERSION:
        return [f"record format {record.get('format_version')} (this galleria reads "
                f"{FORMAT_VERSION})"]
    then = {s["space"]: s for s in record.get("state", {}).get("spaces", [])}
    now = {s.space: s for s in state.spaces if s.count}
    out = []
    for sp in sorted(set(then) - set(now)):
        out.append(f"space {sp} ({then[sp]['kind']}) is gone")
    for sp in sorted(set(now) - set(then)):
        out.append(f"space {sp} ({now[sp].kind}) was added since")
    for sp in sorted(set(now) & set(then)):
        a, b = int(then[sp]["count"]), int(now[sp].count)
        if abs(b - a) > growth * max(a, 1):
            out.append(f"space {sp} holds {b} items (tuned at {a})")
    return out


def tuned_summary(record: Any, state: Any) -> dict[str, Any] | None:
    """What ``galleria info --json`` and ``GET /v1/info`` show of a record (``None``: never
    tuned): the choice, why, its pseudo-query scores and query cost per candidate, whether
    each is calibrated, and why the record is stale (``[]``: it is not)."""
    if record is None:
        return None
    stale = stale_reasons(record, state)
    if not isinstance(record, dict):
        return {"stale": stale}
    cands = [{**{k: c.get(k) for k in ("key", "supported", "r1", "r10", "mrr",
                                        "ms_per_query", "error")},
              "calibrated": bool(c.get("calibration"))}
             for c in record.get("candidates", [])]
    return {"pipeline": record.get("pipeline"), "params": record.get("params"),
            "key": record.get("key"), "reason": record.get("reason"),
            "seed": record.get("seed"), "queries": record.get("queries"),
            "seconds": record.get("seconds"), "created": record.get("created"),
            "stale": stale, "candidates": cands}


def find_candidate(record: Any, pipeline: str, params: Mapping[str, Any] | None = None
                   ) -> dict[str, Any] | None:
    """The record's entry for ``pipeline`` with ``params`` (``None`` when not tuned)."""
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        return None
    key = candidate_key(pipeline, dict(params or {}))
    for c in record.get("candidates", []):
        if c.get("key") == key and c.get("supported"):
            return c
    return None


def calibration_for(record: Any, pipeline: str, params: Mapping[str, Any] | None = None,
                    spaces: list[str] | None = None) -> dict[str, Any] | None:
    """The calibration of ``pipeline`` + ``params`` in ``record``; ``None`` when there is
    none, or when ``spaces`` (the spaces the searcher reads) are not those it was fitted on
    (e.g. during an upgrade, whose merged scores it does not describe)."""
    c = find_candidate(record, pipeline, params)
    if c is None or not c.get("calibration"):
        return None
    if spaces is not None and list(c.get("spaces", [])) != list(spaces):
        return None
    return dict(c["calibration"])


def probabilities(result: SearchResult, calibration: dict[str, Any] | None
                  ) -> np.ndarray | None:
    """``(Q, K)`` float32 match probabilities of ``result`` (``None`` without a
    calibration). ``result.scores`` is left as it is."""
    if calibration is None:
        return None
    return apply(calibration, result.scores)


PROBABILITY_MEANING = (
    "probability: the calibrated probability, in [0, 1], that the result shows the same "
    "object / scene as the query, fitted per pipeline on the gallery's own pseudo-queries "
    "(galleria tune), or during an upgrade per merge rule at the job's last check; "
    "comparable across pipelines and galleries; null when the gallery was not tuned for "
    "the searcher that answered (or the upgrade job has not checked its rule yet). "
    "score: the pipeline's raw score, on "
    "its own scale (cosine similarity for global; larger is better for every pipeline)")
"""What the ``probability`` beside each result means (CLI JSON, HTTP, HTML, UI legend)."""


def searcher_request(searcher: Any) -> tuple[str, dict[str, Any]] | None:
    """``(pipeline, params)`` a searcher answers with, from the decision's spec
    (``None``: a backfill or sharded searcher, which no tuned calibration describes)."""
    spec = getattr(searcher, "spec", None)
    kind = getattr(spec, "kind", None) or getattr(searcher, "kind", None)
    if kind not in ("plain", "pipeline"):
        return None
    return (getattr(spec, "pipeline", None) or "global",
            dict(getattr(spec, "params", ()) or ()))


def searcher_calibration(searcher: Any, record: Any = None) -> dict[str, Any] | None:
    """The calibration of the searcher's pipeline + parameters in its gallery's tuned
    record (``record``: the ``tuned`` setting; default: read from ``searcher.gallery``);
    ``None`` when there is none (not tuned, other parameters or spaces).

    A backfill searcher (an upgrade in progress) merges two spaces no tuned record
    describes: its calibration is the one the upgrade job fitted at its last
    pseudo-query check for the rule it answers with (``searcher.match_calibration()``,
    :mod:`galleria.upgrade.probability`; ``None`` until a check calibrated that rule)."""
    req = searcher_request(searcher)
    if req is None:
        spec = getattr(searcher, "spec", None)
        kind = getattr(spec, "kind", None) or getattr(searcher, "kind", None)
        own = getattr(searcher, "match_calibration", None)
        return own() if kind == "backfill" and callable(own) else None
    if record is None:
        record = searcher.gallery.get_setting(TUNED_KEY)
    return calibration_for(record, req[0], req[1], spaces=list(searcher.spaces))


def searcher_probabilities(searcher: Any, result: SearchResult,
                           record: Any = None) -> np.ndarray | None:
    """Match probabilities for a searcher's result, from its gallery's tuned record.

    Args:
        searcher: any :class:`~galleria.search.contract.Searcher` opened by the decision
            (its ``spec`` names the pipeline and parameters; ``spaces`` the spaces read).
        result: what ``searcher.search`` returned.
        record: the ``tuned`` setting (default: read from ``searcher.gallery``).

    Returns:
        ``(Q, K)`` float32 in ``[0, 1]`` (0 for missing results), or ``None`` when the
        gallery was not tuned for this searcher (:func:`searcher_calibration`).
    """
    return probabilities(result, searcher_calibration(searcher, record))


def at_least_probability(result: SearchResult, prob: np.ndarray, min_probability: float
                         ) -> tuple[SearchResult, np.ndarray]:
    """``result`` and ``prob`` without the entries below ``min_probability`` (kept ones
    first in rank order, the rest padded as missing: ``None`` id, ``-inf`` score, 0).
    Probabilities are compared as they are shown (:data:`PROB_DECIMALS` decimals), so a
    threshold copied from an answer keeps that answer."""
    shown = np.round(np.asarray(prob, np.float64), PROB_DECIMALS)
    low = (shown < float(min_probability)) | ~np.isfinite(result.scores)
    order = np.argsort(low, axis=1, kind="stable")
    low = np.take_along_axis(low, order, 1)
    scores = np.where(low, -np.inf, np.take_along_axis(result.scores, order, 1))
    ids = np.take_along_axis(result.ids, order, 1)
    ids = np.where(low, None if ids.dtype == object else -1, ids)
    p = np.where(low, 0.0, np.take_along_axis(prob, order, 1)).astype(np.float32)
    return SearchResult(scores.astype(np.float32), ids, result.generation), p
