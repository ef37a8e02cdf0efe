"""The self-tuned default: calibrated scores and cost of the default pipeline.

The default pipeline is a rule of the gallery's spaces, not a pseudo-query vote
(:func:`galleria.decision.choose.default_pipeline`: ``hybrid`` on a gallery with a
global and a local space): pseudo-queries are near-copies of gallery images, which
every instance matcher finds, so they favour local features on category and landmark
galleries where the global model is far better (rparis250 Hard mAP 15.6 vs 68.1,
Caltech-101 mAP@R 6.8 vs 64.4 with the old vote). What the tuner decides by default
(:attr:`TuneConfig.pipelines` ``None``): it scores the default pipeline on a fixed,
seeded sample of pseudo-queries (its size does not grow with the gallery), fits the
calibrated match probabilities of its scores and records its query cost; with a
query-cost budget (:attr:`TuneConfig.budget_ms`) it walks down
:data:`HYBRID_VARIANTS` (smaller verification / shortlist) to the first one whose
measured cost fits. The record is deterministic for a seed without a budget (no
timing decides).

With ``pipelines`` named (``galleria tune G --pipelines global,local``), the tuner
scores those candidates and selects one by pseudo-query MRR as before:

Every pipeline the gallery supports (:data:`galleria.search.pipelines.PIPELINES`,
with a few parameter settings where they matter) searches the same seeded
pseudo-queries (:mod:`galleria.images.pseudo`: phone-like views of the gallery's
own images); the rank of each view's source item scores the candidate. The pure
core (:func:`candidates_for`, :func:`summarise`, :func:`select`) sees only
ranks; :func:`tune_gallery` is the thin part that opens searchers over a gallery,
and :func:`tune_and_store` writes the record (schema: :mod:`galleria.tune.record`).

Selection (:func:`select`): candidates are ordered from the broadest and
cheapest to the most specific and expensive (``global``, ``global+sv``,
``local``, ``local+mds``, then any newer pipeline); the first candidate whose
pseudo-query MRR is within a margin of the best one wins (3 points; ``global``
has its own margin, :attr:`TuneConfig.global_margin`, also 3 by default).
A wider ``global`` margin (10) was tried to favour global search on galleries
searched for *similar* images, where pseudo-queries (instance matching)
favour local features: it did not rescue rparis250 (global trails by 26 points
there) and it made a 100-cover SMVS gallery answer phone photos with
``global`` (pseudo MRR 91.3 within 10 of ``global+sv``'s 100; real phone R@1
16 % against 98-100 %), the issue's own failure case.

::

    record = tune_and_store(gallery, TuneConfig(n=200, seed=0))
    record["pipeline"], record["params"]          # what galleria.decision.choose uses
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from galleria import __version__
from galleria import calibration as calibrate
from galleria.decision.choose import default_pipeline
from galleria.errors import GalleriaError, InputError
from galleria.extract.embed import Progress
from galleria.extract.queries import Queries
from galleria.images.pseudo import TUNE_SCENE, PseudoQueries, make_pseudo_queries
from galleria.local.matching import verify_pairs
from galleria.rerank.mds import scaled_defaults
from galleria.search.pipelines import PIPELINES
from galleria.tune.record import (
    FORMAT_VERSION,
    RECORD_TYPE,
    TUNED_KEY,
    candidate_key,
    state_summary,
)
from galleria.types import LocalFeatures, SearchResult

log = logging.getLogger(__name__)

ORDER = ("global", "local", "local+mds", "global+sv")
"""Preference order, broad and cheap first; pipelines not listed follow in PIPELINES order."""
SMALL_ORDER = ("global", "global+sv", "local", "local+mds")
"""Preference order on a gallery no larger than :data:`SV_SHORTLIST`: there ``global+sv``
verifies every item (exhaustive geometric verification, the most reliable instance
matcher, at a bounded cost), so it comes before the indexed local search."""
SV_SHORTLIST = 100
"""``global+sv``'s default shortlist (global results verified per query)."""
LOCAL_ONLY = ("local", "local+mds")
"""Pipelines that cannot search a query without keypoints (such a view counts as a miss)."""
HYBRID_VARIANTS: tuple[dict[str, Any], ...] = (
    {}, {"verify": 10}, {"verify": 5, "candidates": 50}, {"verify": 0, "candidates": 50})
"""``hybrid`` parameter variants from the default down to the cheapest (verification of
the local and global top 20, 10, 5, none): the steps of the query-cost budget."""
MDS_CAP = (100, 200)
"""``(k, candidates)`` of the ``local+mds`` candidate when the scaled defaults exceed them
(bounded tuning and query cost on large galleries)."""


@dataclass(frozen=True)
class Candidate:
    """One pipeline with parameters (``params``: sorted ``(name, value)`` pairs)."""

    pipeline: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return candidate_key(self.pipeline, dict(self.params))


@dataclass(frozen=True)
class TuneConfig:
    """How a gallery is tuned.

    Attributes:
        n: gallery items sampled for pseudo-queries (all when it holds fewer).
        seed: seed of the sample and of the views.
        views: views per sampled item.
        k: result depth scored (MRR@k, R@k) and used for the calibration negatives.
        margin: MRR points within which a broader/cheaper candidate beats the best.
        global_margin: the margin that applies to ``global`` (see the module docstring).
        pipelines: candidates limited to these pipelines (``None``: all).
        calibration: ``isotonic`` or ``logistic`` (:mod:`galleria.calibration`).
        batch: queries per search call (progress granularity).
        min_inliers: a returned item counts as the view's answer too when it is the same
            scene as the source item: at least this many MAGSAC++ homography inliers
            between their stored local features (near-duplicates, other photos of the same
            object or facade); 0: only the source item counts.
        scene: place half of the views in a cluttered frame
            (:data:`galleria.images.pseudo.TUNE_SCENE`); ``False``: crops only.
        budget_ms: query-cost budget of the default pipeline (ms per pseudo-query,
            search only, this machine); ``None``: no budget (the default parameters).
            Only with ``pipelines`` ``None``.
    """

    n: int = 100
    seed: int = 0
    views: int = 1
    k: int = 10
    margin: float = 3.0
    global_margin: float = 3.0
    pipelines: tuple[str, ...] | None = None
    calibration: str = "isotonic"
    batch: int = 16
    min_inliers: int = 20
    scene: bool = True
    budget_ms: float | None = None

    def __post_init__(self) -> None:
        if self.budget_ms is not None and not self.budget_ms > 0:
            raise InputError(f"budget_ms must be > 0; got {self.budget_ms}")
        if self.n < 1 or self.views < 1 or self.k < 1 or self.batch < 1 or self.min_inliers < 0:
            raise InputError("n, views, k and batch must be positive")
        if self.margin < 0 or self.global_margin < 0:
            raise InputError("margins must be >= 0")
        if self.calibration not in calibrate.METHODS:
            raise InputError(f"calibration must be one of {calibrate.METHODS}")
        bad = [p for p in self.pipelines or () if p not in PIPELINES]
        if bad:
            raise InputError(f"unknown pipelines {bad}; known: {', '.join(PIPELINES)}")


@dataclass
class CandidateScore:
    """A candidate's pseudo-query outcome.

    Attributes:
        ranks: ``(P,)`` 0-based rank of the first right answer of each view in the top
            ``k`` (the source item or one of its equivalents); -1 when absent (or the
            query could not be searched: no keypoints).
        scores: ``(P, k)`` the scores returned; ``ids``: ``(P, k)`` the ids returned;
        truth: ``(P, k)`` where a right answer is.
        error: why the candidate could not run (unsupported by the gallery...).
    """

    candidate: Candidate
    ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    exact_ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray | None = None
    ids: np.ndarray | None = None
    truth: np.ndarray | None = None
    blank: int = 0
    search_ms: float = 0.0
    embed_ms: float = 0.0
    spaces: list[str] = field(default_factory=list)
    error: str | None = None


# ------------------------------------------------------------------ pure core


def preference(items: int) -> tuple[str, ...]:
    """The preference order for a gallery of ``items`` items."""
    return SMALL_ORDER if items <= SV_SHORTLIST else ORDER


def order_of(pipeline: str, order: Sequence[str] = ORDER) -> int:
    """Position in ``order`` (pipelines not in it after, in PIPELINES order)."""
    if pipeline in order:
        return list(order).index(pipeline)
    return len(order) + (PIPELINES.index(pipeline) if pipeline in PIPELINES else len(PIPELINES))


def candidates_for(pipelines: Sequence[str], *, items: int, has_global: bool) -> list[Candidate]:
    """The candidates to score, in preference order (:func:`preference`).

    ``local+mds`` is bounded to :data:`MDS_CAP` re-ranked / embedded results when the
    gallery-scaled defaults exceed it, and is tried with a 0.19 global blend too when
    the gallery has a global model.
    """
    out: list[Candidate] = []
    order = preference(items)
    for name in sorted(pipelines, key=lambda p: order_of(p, order)):
        grid: list[dict[str, Any]] = [{}]
        if name == "local+mds":
            _, c = scaled_defaults(items)
            base: dict[str, Any] = {}
            if c > MDS_CAP[1]:
                base = {"k": MDS_CAP[0], "candidates": MDS_CAP[1]}
            grid = [base] + ([{**base, "blend": 0.19}] if has_global else [])
        out += [Candidate(name, tuple(sorted(p.items()))) for p in grid]
    return out


def summarise(ranks: np.ndarray, k: int) -> dict[str, float]:
    """``{r1, r5, r10, mrr, n}`` (percent) from 0-based ranks (-1: not in the top ``k``)."""
    r = np.asarray(ranks, np.int64)
    if not len(r):
        return {"r1": 0.0, "r5": 0.0, "r10": 0.0, "mrr": 0.0, "n": 0}
    found = (r >= 0) & (r < k)

    def at(m: int) -> float:
        return round(100.0 * float(np.mean(found & (r < m))), 2)

    mrr = np.where(found, 1.0 / (np.maximum(r, 0) + 1.0), 0.0)
    return {"r1": at(1), "r5": at(5), "r10": at(10),
            "mrr": round(100.0 * float(mrr.mean()), 2), "n": len(r)}


def select(scored: Sequence[tuple[Candidate, dict[str, float]]], *, margin: float = 3.0,
           global_margin: float = 3.0, order: Sequence[str] = ORDER
           ) -> tuple[Candidate, str]:
    """The default among scored candidates -> ``(candidate, reason)``.

    ``scored``: ``(candidate, summarise(...))`` of the candidates that ran. The first
    candidate in preference ``order`` (pipeline names) whose MRR is within its margin of
    the best MRR wins
    (``global``: ``global_margin``; others: ``margin``); ties go to the earlier one.
    Pure and deterministic.
    """
    if not scored:
        raise InputError("no candidate pipeline could search this gallery")
    ranked = sorted(scored, key=lambda cs: (order_of(cs[0].pipeline, order), cs[0].key))
    best_c, best = max(ranked, key=lambda cs: cs[1]["mrr"])  # max keeps the first of ties
    for cand, s in ranked:
        m = global_margin if cand.pipeline == "global" else margin
        if s["mrr"] >= best["mrr"] - m:
            if cand == best_c:
                why = f"best pseudo-query MRR ({s['mrr']:.1f})"
            else:
                why = (f"MRR {s['mrr']:.1f} within {m:g} points of the best "
                       f"({best_c.key}: {best['mrr']:.1f}); broader / cheaper first")
            return cand, why
    raise AssertionError("unreachable: the best candidate is within its own margin")


def default_candidates(has_global: bool, has_local: bool, *, budget: bool = False
                       ) -> list[Candidate]:
    """The default pipeline of the gallery's spaces, then (with a budget) its cheaper
    variants (:data:`HYBRID_VARIANTS`), most thorough first."""
    name = default_pipeline(has_global, has_local)
    grid = HYBRID_VARIANTS if (name == "hybrid" and budget) else ({},)
    return [Candidate(name, tuple(sorted(p.items()))) for p in grid]


def within_budget(search_ms: float, budget_ms: float | None) -> bool:
    """No budget, or a measured cost within it."""
    return budget_ms is None or search_ms <= budget_ms


def default_choice(results: Sequence[CandidateScore], budget_ms: float | None,
                   has_global: bool, has_local: bool) -> tuple[Candidate, str]:
    """The default mode's choice among the scored variants (most thorough first) ->
    ``(candidate, reason)``: the first within the budget, else the cheapest scored."""
    ran = [r for r in results if r.error is None]
    if not ran:
        raise InputError("the default pipeline could not search this gallery: "
                         + "; ".join(str(r.error) for r in results))
    kinds = " and ".join(k for k, has in (("global", has_global), ("local", has_local)) if has)
    why = f"the default of a gallery with {kinds} spaces"
    if budget_ms is None:
        return ran[0].candidate, why + "; scores calibrated on pseudo-queries"
    for r in ran:
        if within_budget(r.search_ms, budget_ms):
            return r.candidate, (f"{why}; {r.search_ms:.0f} ms/query within the "
                                 f"{budget_ms:g} ms budget")
    last = ran[-1]
    return last.candidate, (f"{why}; the cheapest variant ({last.search_ms:.0f} ms/query) "
                            f"is over the {budget_ms:g} ms budget")


# ------------------------------------------------------------------ over a gallery


def _open(gallery: Any, cand: Candidate) -> Any:
    from galleria.decision import open_searcher  # the decision layer imports search, not tune

    return open_searcher(gallery, pipeline=cand.pipeline, **dict(cand.params))


def _embed(models: dict[str, Any], pq: PseudoQueries, progress: Progress | None
           ) -> tuple[Queries, dict[str, float]]:
    """Pseudo-query data per space (each model runs once) and ms per query per space."""
    data: dict[str, Any] = {}
    ms: dict[str, float] = {}
    for space, model in models.items():
        t0 = time.perf_counter()
        out: list[Any] = []
        for i in range(0, len(pq), 16):
            chunk = model.embed_images(pq.images[i: i + 16])
            out += list(chunk)
            if progress is not None:
                progress.update(len(pq.images[i: i + 16]))
        ms[space] = 1000 * (time.perf_counter() - t0) / max(len(pq), 1)
        data[space] = np.stack(out) if model.kind != "local" else out
    return Queries(data), ms


def _score(searcher: Any, cand: Candidate, q: Queries, pq: PseudoQueries, cfg: TuneConfig,
           progress: Progress | None) -> CandidateScore:
    """Search the pseudo-queries with one candidate; ranks, scores and timing."""
    P = len(pq)
    usable = np.ones(P, bool)
    if cand.pipeline in LOCAL_ONLY:
        for s in searcher.spaces:
            feats = q[s]
            if not isinstance(feats, np.ndarray) and len(feats) and isinstance(
                    feats[0], LocalFeatures):
                usable &= np.array([len(f) > 0 for f in feats], bool)
    rows = np.flatnonzero(usable)
    k = max(1, min(cfg.k, len(searcher.gallery)))
    scores = np.full((P, k), -np.inf, np.float32)
    ids = np.full((P, k), None, object)
    t0 = time.perf_counter()
    for i in range(0, len(rows), cfg.batch):
        part = rows[i: i + cfg.batch]
        sub = q.take(part.tolist())
        res: SearchResult = searcher.search(Queries({s: sub[s] for s in searcher.spaces}), k)
        scores[part, : res.k] = res.scores
        ids[part, : res.k] = res.ids
        if progress is not None:
            progress.update(len(part))
    search_ms = 1000 * (time.perf_counter() - t0) / max(len(rows), 1)
    if progress is not None and len(rows) < P:
        progress.update(P - len(rows))
    truth = ids == np.asarray(pq.ids, object)[:, None]
    ranks = first_hit(truth)
    return CandidateScore(cand, ranks, ranks.copy(), scores, ids, truth, blank=int(P - len(rows)),
                          search_ms=search_ms, spaces=list(searcher.spaces))


def first_hit(truth: np.ndarray) -> np.ndarray:
    """``(P,)`` 0-based column of each row's first True; -1 for none."""
    return np.where(truth.any(axis=1), truth.argmax(axis=1), -1)


def to_verify(ids: np.ndarray, source: str, depth: int = 3) -> list[str]:
    """Items of one result row whose equivalence to ``source`` can matter: those ranked
    above the source (all of the row when it is absent) and the top ``depth``."""
    row = [str(i) for i in ids if i is not None]
    cut = row.index(source) if source in row else len(row)
    return [i for i in row[: max(cut, depth)] if i != source]


def equivalents(gallery: Any, pq: PseudoQueries, returned: Sequence[np.ndarray], *,
                min_inliers: int, depth: int = 3) -> list[set[str]]:
    """Per pseudo-query, the returned items that are the same scene as its source item.

    ``returned``: ``(P, k)`` id arrays of the candidates. Each distinct item that can
    change a candidate's rank of the first right answer (ranked above the source) or
    lies in a top ``depth`` is verified once against the source (MAGSAC++ homography
    inliers of mutual nearest-neighbour matches of the stored local features);
    ``>= min_inliers`` inliers make it an equivalent. Without a local space: none.
    """

    out: list[set[str]] = [set() for _ in range(len(pq))]
    local = gallery.state().of_kind("local")
    if not min_inliers or not local:
        return out
    space = max(local, key=lambda s: s.count).space
    for p, src in enumerate(pq.ids):
        others = sorted({i for r in returned for i in to_verify(r[p], src, depth)})
        if not others:
            continue
        keys = gallery.keys_of([src, *others])
        ok = keys >= 0
        if not ok[0]:
            continue
        feats = gallery.get_local(keys[ok], space=space)
        names = [n for n, good in zip([src, *others], ok, strict=True) if good][1:]
        inl = verify_pairs(feats[0], feats[1:])
        out[p] = {n for n, c in zip(names, inl, strict=True) if c >= min_inliers}
    return out


def with_equivalents(cs: CandidateScore, pq: PseudoQueries, eq: list[set[str]]) -> None:
    """Count equivalents as right answers too (updates ``truth`` and ``ranks``)."""
    if cs.ids is None or cs.truth is None:
        return
    for p in range(len(pq)):
        if eq[p]:
            cs.truth[p] |= np.array([i in eq[p] for i in cs.ids[p]], bool)
    cs.ranks = first_hit(cs.truth)


def tune_gallery(gallery: Any, config: TuneConfig | None = None, *,
                 progress: Progress | None = None,
                 pseudo: PseudoQueries | None = None) -> dict[str, Any]:
    """Score every supported candidate on pseudo-queries of ``gallery``; return the record.

    Args:
        gallery: an open :class:`~galleria.store.gallery.Gallery`.
        config: :class:`TuneConfig`.
        progress: ``update(n)`` per pseudo-query embedded or searched (a tqdm bar);
            the total is :func:`progress_total`.
        pseudo: pseudo-queries to use instead of sampling (tests, benchmarks).

    Returns:
        The record (:mod:`galleria.tune.record` schema); nothing is written.
    """
    cfg = config or TuneConfig()
    t_start = time.perf_counter()
    state = gallery.state()
    summary = state_summary(state)
    if not summary["spaces"]:
        raise InputError(f"gallery {gallery.path} has no items yet: index images first")
    has_global = any(s["kind"] == "global" for s in summary["spaces"])
    has_local = any(s["kind"] == "local" for s in summary["spaces"])
    if cfg.pipelines is None:
        cands = default_candidates(has_global, has_local, budget=cfg.budget_ms is not None)
    else:
        pipes = [p for p in PIPELINES if p in cfg.pipelines]
        cands = candidates_for(pipes, items=summary["items"], has_global=has_global)
    searchers: dict[Candidate, Any] = {}
    results: list[CandidateScore] = []
    for cand in cands:
        try:
            searchers[cand] = _open(gallery, cand)
        except GalleriaError as exc:
            log.info("candidate %s unsupported: %s", cand.key, exc)
            results.append(CandidateScore(cand, error=str(exc)))
    if not searchers:
        raise InputError(f"no pipeline can search {gallery.path}: "
                         + "; ".join(r.error or "" for r in results))
    pq = pseudo or make_pseudo_queries(gallery, n=cfg.n, seed=cfg.seed, views=cfg.views,
                                       scene=TUNE_SCENE if cfg.scene else None)
    models: dict[str, Any] = {}
    for s in searchers.values():
        for space in s.spaces:
            models.setdefault(space, s.model(space))
    q, embed_ms = _embed(models, pq, progress)
    for cand, s in searchers.items():
        try:
            cs = _score(s, cand, q, pq, cfg, progress)
        except GalleriaError as exc:
            log.warning("candidate %s failed on the pseudo-queries: %s", cand.key, exc)
            results.append(CandidateScore(cand, error=str(exc)))
            continue
        cs.embed_ms = sum(embed_ms[sp] for sp in cs.spaces)
        results.append(cs)
        if cfg.pipelines is None and within_budget(cs.search_ms, cfg.budget_ms):
            break  # the default (or the first variant within the budget): no cheaper one
    t_eq = time.perf_counter()
    eq = equivalents(gallery, pq, [r.ids for r in results if r.ids is not None],
                     min_inliers=cfg.min_inliers)
    for r in results:
        with_equivalents(r, pq, eq)
    t_eq = time.perf_counter() - t_eq
    results.sort(key=lambda r: cands.index(r.candidate))
    ran = [(r.candidate, summarise(r.ranks, cfg.k)) for r in results if r.error is None]
    if cfg.pipelines is None:
        chosen, reason = default_choice(results, cfg.budget_ms, has_global, has_local)
    else:
        chosen, reason = select(ran, margin=cfg.margin, global_margin=cfg.global_margin,
                                order=preference(summary["items"]))
    return {
        "type": RECORD_TYPE, "format_version": FORMAT_VERSION,
        "pipeline": chosen.pipeline, "params": dict(chosen.params), "key": chosen.key,
        "reason": reason, "seed": int(pq.seed), "n": int(cfg.n), "k": int(cfg.k),
        "views": int(cfg.views), "queries": len(pq), "skipped": len(pq.skipped),
        "augment": pq.augment, "pseudo_fingerprint": pq.fingerprint,
        "rule": {"metric": "mrr", "margin": cfg.margin, "global_margin": cfg.global_margin,
                 "min_inliers": cfg.min_inliers, "order": [c.key for c in cands],
                 "mode": "default" if cfg.pipelines is None else "select",
                 "budget_ms": cfg.budget_ms},
        "equivalents": {"views_with_any": sum(1 for e in eq if e),
                        "mean": round(float(np.mean([len(e) for e in eq])), 3),
                        "seconds": round(t_eq, 2)},
        "state": summary,
        "candidates": [_entry(r, cfg) for r in results],
        "seconds": round(time.perf_counter() - t_start, 2),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "galleria": _version(),
    }


def _entry(r: CandidateScore, cfg: TuneConfig) -> dict[str, Any]:
    base = {"key": r.candidate.key, "pipeline": r.candidate.pipeline,
            "params": dict(r.candidate.params)}
    if r.error is not None:
        return {**base, "supported": False, "error": r.error}
    exact = summarise(r.exact_ranks, cfg.k)
    out = {**base, "supported": True, **summarise(r.ranks, cfg.k),
           "exact": {"r1": exact["r1"], "mrr": exact["mrr"]}, "blank": r.blank,
           "search_ms": round(r.search_ms, 2), "embed_ms": round(r.embed_ms, 2),
           "ms_per_query": round(r.search_ms + r.embed_ms, 2), "spaces": r.spaces}
    assert r.scores is not None and r.truth is not None
    try:
        out["calibration"] = calibrate.fit(r.scores, r.truth, method=cfg.calibration)
    except InputError as exc:  # no positives (or no negatives): nothing to calibrate on
        out["calibration"] = None
        out["calibration_error"] = str(exc)
    return out


def _version() -> str:
    return str(__version__)


def progress_total(gallery: Any, config: TuneConfig | None = None) -> int:
    """Upper bound of the progress units :func:`tune_gallery` reports (for a bar)."""
    cfg = config or TuneConfig()
    state = gallery.state()
    summary = state_summary(state)
    p = min(cfg.n, summary["items"]) * cfg.views
    has_global = any(s["kind"] == "global" for s in summary["spaces"])
    has_local = any(s["kind"] == "local" for s in summary["spaces"])
    if cfg.pipelines is None:
        n_c = len(default_candidates(has_global, has_local, budget=cfg.budget_ms is not None))
    else:
        pipes = [x for x in PIPELINES if x in cfg.pipelines]
        n_c = len(candidates_for(pipes, items=summary["items"], has_global=has_global))
    return p * (len(summary["spaces"]) + n_c)


def tune_and_store(gallery: Any, config: TuneConfig | None = None, *,
                   progress: Progress | None = None) -> dict[str, Any]:
    """:func:`tune_gallery`, then store the record as the gallery's ``tuned`` setting
    (one transaction: readers see the old record or the new one)."""
    record = tune_gallery(gallery, config, progress=progress)
    gallery.update_settings({TUNED_KEY: record})
    log.info("tuned %s: %s (%s)", gallery.path, record["key"], record["reason"])
    return record
