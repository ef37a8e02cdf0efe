"""Near-duplicate detection, the pure parts: the rule, candidate pairs, groups.

A *near-duplicate* is another copy of the same picture: cropped, re-encoded,
resized, lightly edited. The rule (:class:`DedupConfig`), in two stages:

1. **Candidates** from the global index: every item's ``k`` nearest neighbours
   whose cosine similarity reaches ``candidate`` (a symmetric pair is kept once).
2. **Decision.** With local features (the gallery has a local space, ``verify``
   not ``never``): a candidate is a near-duplicate when its MAGSAC++ homography
   between the two images has at least ``min_inliers`` inliers, or when its
   cosine reaches ``sure`` (copies so close that any verification is moot, and
   images too plain to have keypoints). Without local features: when its cosine
   reaches ``threshold``.

Groups (``linkage``): ``complete`` (default) -- every image of a group is a
near-duplicate of every other: pairs are taken strongest first (cosine) and two
groups merge only when all their cross pairs are near-duplicates; ``single`` -- the
connected components (``a ~ b`` and ``b ~ c`` put ``a, b, c`` in one group), which
chain photo bursts and several photos of one object into large groups
(``benchmarks/results/dedup.md`` measures both).

The thresholds are cosine similarities of L2-normalised global embeddings, so
they depend on the model; the defaults were chosen for the EfficientNet-Lite
models on a tuning set of planted copies of Caltech-101 *train* images and
checked on copies of other images (``benchmarks/bench_dedup.py``,
``benchmarks/results/dedup.md``). With ``min_probability`` the threshold comes
from the gallery's own calibrated match probability (``galleria tune``): the
cosine from which a result of the global model is a true match with at least that
probability, on phone-like views of the gallery's own images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.types import MISSING_KEY

VERIFY = ("auto", "always", "never")
LINKAGE = ("complete", "single")
CALIBRATION_KEY = "dedup_threshold"
"""Gallery setting a calibration step may write: ``{"threshold": cosine, "candidate":
cosine, "source": ...}`` for the gallery's model (see :func:`calibrated_threshold`)."""


@dataclass(frozen=True)
class DedupConfig:
    """The near-duplicate rule (see the module docstring).

    Attributes:
        k: neighbours examined per item.
        candidate: cosine from which a pair is verified with local features.
        threshold: cosine from which a pair is a near-duplicate without local features.
        sure: cosine from which a pair is a near-duplicate even when verification finds
            too few inliers.
        min_inliers: homography inliers that confirm a candidate.
        verify: ``auto`` (when the gallery has local features), ``always`` (error
            without them) or ``never``.
        max_features: keypoints per image used for verification (the strongest).
        linkage: how pairs form groups: ``complete`` (every pair in a group is a
            near-duplicate) or ``single`` (connected components).
        min_probability: take ``threshold`` from the gallery's calibrated match
            probability (``galleria tune``): the cosine from which the global model's
            probability of a true match is at least this (``None``: the cosines above).
    """

    k: int = 10
    candidate: float = 0.75
    threshold: float = 0.92
    sure: float = 0.97
    min_inliers: int = 25
    verify: str = "auto"
    max_features: int = 1000
    linkage: str = "complete"
    min_probability: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 1000:
            raise InputError(f"k must be an integer in 1..1000; got {self.k!r}")
        for name in ("candidate", "threshold", "sure"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -1.0 <= float(v) <= 1.0:
                raise InputError(f"{name} must be a cosine similarity in [-1, 1]; got {v!r}")
        mp = self.min_probability
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, (int, float))
                               or not 0.0 <= float(mp) <= 1.0):
            raise InputError(f"min_probability must be in [0, 1]; got {mp!r}")
        if self.linkage not in LINKAGE:
            raise InputError(f"linkage must be one of {LINKAGE}; got {self.linkage!r}")
        if self.verify not in VERIFY:
            raise InputError(f"verify must be one of {VERIFY}; got {self.verify!r}")
        if self.min_inliers < 4:
            raise InputError("min_inliers must be >= 4 (a homography needs 4 matches)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrated_threshold(settings: dict[str, Any]) -> dict[str, float] | None:
    """Thresholds a calibration recorded for this gallery's model (``None``: none yet).

    When a gallery records ``CALIBRATION_KEY``, ``galleria dedup`` uses its ``threshold``
    / ``candidate`` instead of the defaults, and says so in its report (the calibrated
    match probability of ``galleria tune`` is used with ``min_probability``).
    """
    rec = settings.get(CALIBRATION_KEY)
    if not isinstance(rec, dict):
        return None
    out = {k: float(rec[k]) for k in ("threshold", "candidate", "sure") if
           isinstance(rec.get(k), (int, float)) and -1.0 <= float(rec[k]) <= 1.0}
    return out or None


def candidate_pairs(keys: np.ndarray, neighbours: np.ndarray, scores: np.ndarray,
                    min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Unordered pairs among the neighbour lists, scoring at least ``min_score``.

    Args:
        keys: ``(N,)`` int64 key of each query item.
        neighbours: ``(N, K)`` int64 neighbour keys (``-1`` padding; the item itself may
            appear and is ignored).
        scores: ``(N, K)`` their cosine similarities.

    Returns:
        ``(pairs (P, 2) int64 with a < b, sorted; scores (P,) float32)``; a pair found
        from both ends is kept once (with the higher score).
    """
    keys = np.asarray(keys, np.int64)
    a = np.repeat(keys, neighbours.shape[1])
    b = np.asarray(neighbours, np.int64).reshape(-1)
    s = np.asarray(scores, np.float32).reshape(-1)
    ok = (b != MISSING_KEY) & (b != a) & (s >= min_score)
    a, b, s = a[ok], b[ok], s[ok]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if lo.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    order = np.lexsort((-s, hi, lo))
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(lo.size, bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return np.stack([lo[first], hi[first]], axis=1), s[first]


def decide(scores: np.ndarray, inliers: np.ndarray | None, config: DedupConfig) -> np.ndarray:
    """``(P,)`` bool: which candidate pairs are near-duplicates (``inliers``: ``None``
    when there are no local features)."""
    scores = np.asarray(scores, np.float32)
    if inliers is None:
        return scores >= config.threshold
    return (np.asarray(inliers) >= config.min_inliers) | (scores >= config.sure)


def groups(pairs: np.ndarray, scores: np.ndarray | None = None, *,
           linkage: str = "single") -> list[list[int]]:
    """Groups of the near-duplicate ``pairs`` ``(P, 2)``: lists of keys, each sorted,
    largest group first (ties: smallest key first).

    ``linkage="single"``: connected components (union-find). ``"complete"``: pairs
    taken by decreasing ``scores`` ``(P,)`` (given order when ``None``), two groups
    merged only when every pair across them is in ``pairs``.
    """
    if linkage == "complete":
        return _complete_groups(np.asarray(pairs, np.int64), scores)
    if linkage != "single":
        raise InputError(f"linkage must be one of {LINKAGE}; got {linkage!r}")
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in np.asarray(pairs, np.int64).tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        parent.setdefault(a, a)
        parent.setdefault(b, b)
    comp: dict[int, list[int]] = {}
    for x in parent:
        comp.setdefault(find(x), []).append(x)
    out = [sorted(v) for v in comp.values()]
    out.sort(key=lambda g: (-len(g), g[0]))
    return out


def _complete_groups(pairs: np.ndarray, scores: np.ndarray | None) -> list[list[int]]:
    linked = {(int(a), int(b)) for a, b in pairs.tolist()}
    linked |= {(b, a) for a, b in linked}
    order = (np.arange(len(pairs)) if scores is None
             else np.argsort(-np.asarray(scores, np.float64), kind="stable"))
    group_of: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i in order.tolist():
        a, b = (int(x) for x in pairs[i])
        ga, gb = group_of.get(a, a), group_of.get(b, b)
        if ga == gb:
            continue
        ma, mb = members.get(ga, [a]), members.get(gb, [b])
        if all((x, y) in linked for x in ma for y in mb):
            merged = ma + mb
            for x in merged:
                group_of[x] = ga
            members[ga] = merged
            members.pop(gb, None)
    out = [sorted(v) for v in members.values()]
    out.sort(key=lambda g: (-len(g), g[0]))
    return out
