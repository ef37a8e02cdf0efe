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
    locals_ = state.of_kind("local")
    local = max(locals_, key=lambda s: s.count).space if locals_ else None
    if config.verify == "always" and local is None:
        raise InputError(f"{gallery.path} has no local features to verify with (index with "
                         "--local sift), or use verify auto/never")
    use_local = local is not None and config.verify != "never"
    floor = config.candidate if use_local else config.threshold
    view = gallery.view(prim.space)
    k = min(config.k + 1, view.count)
    all_pairs, all_scores = [], []
    n_items = 0
    bar = progress("dedup: search", view.count) if progress is not None else None
    for keys, vecs in gallery.iter_vectors(prim.space, batch=BATCH):
        res = view.search(vecs, k)
        p, s = candidate_pairs(keys, res.ids, res.scores, floor)
        all_pairs.append(p)
        all_scores.append(s)
        n_items += len(keys)
        if bar is not None:
            bar.update(len(keys))
    if bar is not None:
        bar.close()
    pairs, scores = candidate_pairs(  # one pair per unordered couple across batches
        np.concatenate([p[:, 0] for p in all_pairs]) if all_pairs else np.zeros(0, np.int64),
        np.concatenate([p[:, 1] for p in all_pairs])[:, None] if all_pairs
        else np.zeros((0, 1), np.int64),
        np.concatenate(all_scores)[:, None] if all_scores else np.zeros((0, 1), np.float32),
        floor)
    t_cand = time.perf_counter()
    inliers = _verify(gallery, local, pairs, scores, config, progress) if use_local else None
    t_ver = time.perf_counter()
    dup = decide(scores, inliers, config)
    key_groups = groups(pairs[dup])
    id_of = {int(k_): str(i) for k_, i in zip(
        np.unique(pairs.reshape(-1)).tolist(), gallery.ids_of(np.unique(pairs.reshape(-1))),
        strict=True)} if pairs.size else {}
    report = DedupReport(
        gallery=str(gallery.path), space=prim.space, local_space=local if use_local else None,
        config=config, thresholds_from=source, items=n_items, candidates=len(pairs),
        verified=int(0 if inliers is None else (scores < config.sure).sum()),
        groups=[[id_of[x] for x in g] for g in key_groups])
    for (a, b), s, d, n in zip(pairs.tolist(), scores.tolist(), dup.tolist(),
                               (inliers.tolist() if inliers is not None else [None] * len(pairs)),
                               strict=True):
        if d:
            report.pairs.append({"a": id_of[a], "b": id_of[b], "score": round(float(s), 5),
                                 "inliers": None if n is None else int(n)})
    report.seconds = {"candidates": t_cand - t0, "verify": t_ver - t_cand,
                      "total": time.perf_counter() - t0}
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
