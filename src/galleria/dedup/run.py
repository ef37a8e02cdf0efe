"""``galleria dedup``: find the near-duplicate groups of a gallery.

:func:`find_duplicates` reads the gallery through the store's API (its views and
vectors; local features when it has them), applies the rule of
:mod:`galleria.dedup.core` and returns a :class:`DedupReport` (JSON, and an HTML
page of the groups with :mod:`galleria.dedup.report`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galleria.calibration import score_at
from galleria.dedup.core import (
    DedupConfig,
    calibrated_threshold,
    candidate_pairs,
    decide,
    groups,
)
from galleria.errors import InputError
from galleria.local.matching import verify_pairs
from galleria.store.gallery import Gallery
from galleria.tune.record import TUNED_KEY, calibration_for
from galleria.types import LocalFeatures

log = logging.getLogger(__name__)

BATCH = 1024
VERIFY_CHUNK = 256


@dataclass
class DedupReport:
    """What :func:`find_duplicates` found (``to_dict()`` is the JSON report)."""

    gallery: str
    space: str
    local_space: str | None
    config: DedupConfig
    thresholds_from: str
    items: int
    candidates: int
    verified: int
    groups: list[list[str]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        """Items that are a near-duplicate of another (group sizes minus one each)."""
        return sum(len(g) - 1 for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"gallery": self.gallery, "space": self.space, "local_space": self.local_space,
                "rule": self.config.to_dict(), "thresholds_from": self.thresholds_from,
                "items": self.items, "candidate_pairs": self.candidates,
                "verified_pairs": self.verified, "groups": self.groups,
                "duplicates": self.duplicates, "pairs": self.pairs,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _strongest(f: LocalFeatures, n: int) -> LocalFeatures:
    if len(f) <= n:
        return f
    keep = np.sort(np.argsort(-f.keypoints[:, 3], kind="stable")[:n])
    return LocalFeatures(f.keypoints[keep], f.descriptors[keep], f.image_size)


ProgressFactory = Callable[[str, int], Any]
"""``(description, total) -> a progress bar`` (``update(n)``, ``close()``)."""


@dataclass
class Candidates:
    """Candidate pairs with what the rule needs: ``pairs (P, 2)`` int64 keys (``a < b``),
    ``scores (P,)`` cosine, ``inliers (P,)`` (``-1``: not verified; ``None`` without
    local features) and ``ids`` (key -> item id)."""

    pairs: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray | None
    ids: dict[int, str]
    items: int
    space: str
    local_space: str | None
    config: DedupConfig
    thresholds_from: str
    seconds: dict[str, float]


def probability_threshold(state: Any, space: str, probability: float) -> float:
    """The cosine of ``space`` from which the gallery's calibrated probability of a true
    match (the ``global`` pipeline's calibration, ``galleria tune``) is at least
    ``probability``; an InputError when the gallery has none or it never gets there."""
    cal = calibration_for(state.setting(TUNED_KEY), "global", {}, spaces=[space])
    if cal is None:
        raise InputError("min_probability needs the gallery's calibrated match probability "
                         "of its global model: run `galleria tune G` first (or give cosine "
                         "thresholds)")
    t = score_at(cal, probability)
    if t is None:
        raise InputError(f"no cosine reaches a match probability of {probability:g} on this "
                         "gallery; ask for less")
    return float(min(1.0, max(-1.0, t)))


def score_candidates(gallery: Gallery, config: DedupConfig | None = None, *,
                     progress: ProgressFactory | None = None) -> Candidates:
    """Candidate pairs of ``gallery`` from its global index, verified with its local
    features when it has them (stage 1 of :mod:`galleria.dedup.core`; :func:`decide`
    is stage 2). Thresholds a calibration recorded in the gallery replace the
    defaults."""
    config = config or DedupConfig()
    t0 = time.perf_counter()
    state = gallery.state()
    prim = state.space(state.primary)
    if prim is None or prim.kind != "global" or prim.count == 0:
        raise InputError(f"{gallery.path} has no global space with items: dedup compares "
                         "global embeddings first (index with --model)")
    source = "defaults"
    cal = calibrated_threshold(state.settings)
    if cal:
        config = dataclasses.replace(config, **cal)
        source = "calibrated (gallery setting)"
    if config.min_probability is not None:
        t = probability_threshold(state, prim.space, config.min_probability)
        config = dataclasses.replace(config, threshold=t, candidate=min(config.candidate, t))
        source = (f"calibrated match probability >= {config.min_probability:g} "
                  f"(galleria tune): cosine {t:.4f}")
    locals_ = state.of_kind("local")
    local = max(locals_, key=lambda s: s.count).space if locals_ else None
    if config.verify == "always" and local is None:
        raise InputError(f"{gallery.path} has no local features to verify with (index with "
                         "--local sift), or use verify auto/never")
    use_local = local is not None and config.verify != "never"
    floor = config.candidate if use_local else config.threshold
    view = gallery.view(prim.space)
    k = min(config.k + 1, view.count)
    found_a, found_b, found_s = [], [], []
    n_items = 0
    bar = progress("dedup: search", view.count) if progress is not None else None
    for keys, vecs in gallery.iter_vectors(prim.space, batch=BATCH):
        res = view.search(vecs, k)
        p, sc = candidate_pairs(keys, res.ids, res.scores, floor)
        found_a.append(p[:, 0])
        found_b.append(p[:, 1])
        found_s.append(sc)
        n_items += len(keys)
        if bar is not None:
            bar.update(len(keys))
    if bar is not None:
        bar.close()
    if found_a:  # one pair per unordered couple across batches
        pairs, scores = candidate_pairs(np.concatenate(found_a), np.concatenate(found_b)[:, None],
                                        np.concatenate(found_s)[:, None], floor)
    else:
        pairs, scores = np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    t_cand = time.perf_counter()
    inliers = _verify(gallery, local, pairs, scores, config, progress) if use_local else None
    t_ver = time.perf_counter()
    uniq = np.unique(pairs.reshape(-1))
    ids = {int(k_): str(i) for k_, i in zip(uniq.tolist(), gallery.ids_of(uniq), strict=True)}
    return Candidates(pairs, scores, inliers, ids, n_items, prim.space,
                      local if use_local else None, config, source,
                      {"candidates": t_cand - t0, "verify": t_ver - t_cand})


def find_duplicates(gallery: Gallery, config: DedupConfig | None = None, *,
                    progress: ProgressFactory | None = None) -> DedupReport:
    """Near-duplicate groups of ``gallery`` (see :mod:`galleria.dedup.core`).

    Args:
        gallery: an open gallery with a global space (its primary space is used).
        config: the rule (defaults: :class:`DedupConfig`); thresholds a calibration
            recorded in the gallery replace the defaults (not values given here).
        progress: makes the progress bars: one over the items searched, one over the
            candidate pairs verified.
    """
    t0 = time.perf_counter()
    c = score_candidates(gallery, config, progress=progress)
    return report_of(c, decide(c.scores, c.inliers, c.config), gallery=str(gallery.path),
                     seconds={**c.seconds, "total": time.perf_counter() - t0})


def report_of(c: Candidates, dup: np.ndarray, *, gallery: str,
              seconds: dict[str, float]) -> DedupReport:
    """The report of candidates ``c`` under the decisions ``dup`` ``(P,)`` bool."""
    report = DedupReport(
        gallery=gallery, space=c.space, local_space=c.local_space, config=c.config,
        thresholds_from=c.thresholds_from, items=c.items, candidates=len(c.pairs),
        verified=int(0 if c.inliers is None else (c.inliers >= 0).sum()),
        groups=[[c.ids[x] for x in g] for g in groups(
            c.pairs[dup], c.scores[dup], linkage=c.config.linkage)], seconds=seconds)
    inl = c.inliers.tolist() if c.inliers is not None else [None] * len(c.pairs)
    for (a, b), sc, d, n in zip(c.pairs.tolist(), c.scores.tolist(), dup.tolist(), inl,
                                strict=True):
        if d:
            report.pairs.append({"a": c.ids[a], "b": c.ids[b], "score": round(float(sc), 5),
                                 "inliers": None if n is None else int(n)})
    return report


def _verify(gallery: Gallery, local: str | None, pairs: np.ndarray, scores: np.ndarray,
            config: DedupConfig, progress: ProgressFactory | None) -> np.ndarray:
    """``(P,)`` homography inliers of each pair (``-1``: not verified: cosine above
    ``sure``, or an image without local features)."""
    out = np.full(len(pairs), -1, np.int32)
    todo = np.flatnonzero(scores < config.sure)
    if local is None or todo.size == 0:
        return out
    with gallery.snapshot() as snap:
        have = snap.present(local, np.unique(pairs[todo].reshape(-1)).tolist())
    bar = progress("dedup: verify", int(todo.size)) if progress is not None else None
    for s in range(0, todo.size, VERIFY_CHUNK):
        idx = todo[s : s + VERIFY_CHUNK]
        need = sorted({int(x) for x in pairs[idx].reshape(-1)} & have)
        feats = dict(zip(need, gallery.get_local(np.array(need, np.int64), space=local),
                         strict=True)) if need else {}
        for i in idx.tolist():
            a, b = (int(x) for x in pairs[i])
            if a in feats and b in feats:
                fa = _strongest(feats[a], config.max_features)
                fb = _strongest(feats[b], config.max_features)
                out[i] = int(verify_pairs(fa, [fb])[0])
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out
