"""Rule ``ensemble``: both models on every item, the new side of unmoved items predicted.

Every item scores the mean of a Z-normed old-model score and a Z-normed new-model
score (per query, against the job's cohort, as rule ``both``)::

    score(x) = 0.5 z_old(x) + 0.5 z_new(x)
    z_old(x) = (old(q) . old(x) - mo) / so                  every item (moved items:
                                                            the old vectors the job kept)
    z_new(x) = (new(q) . new(x) - mn) / sn                  moved items
    z_new(x) = (new(q) . ghat(x) - me) / se                 items not moved yet,
               ghat(x) = normalize(phi(old(x)))

``(mo, so)``, ``(mn, sn)``: the top-100 cohort statistics of rule ``both``;
``(me, se)``: those of ``new(q)`` against ``phi`` of the cohort's old vectors.
``phi`` (:mod:`galleria.upgrade.phi`) is learned online from the job's pairs and
pseudo-query pairs.

Search of the items not moved yet is exact on a candidate set: the old part's
index is searched (one batch) with the plain ``old(q)`` and with a linear
surrogate of the score, ``normalize(old(q) / so + (new(q) W) / (c se))``
(``phi(x) = x W^T + b`` before its normalisation, ``c`` the mean norm of
``phi(x)`` on the cohort: the surrogate is the score with that norm taken as
constant), :func:`candidate_depth` each; the candidates' old vectors are read
and scored exactly. The answer is exact unless an item of the true top-``k``
is in neither candidate list (an approximation only then; the candidate depth
is at least 4 ``k`` and :data:`ENSEMBLE_DEPTH`). The moved items are scored
exactly by :meth:`galleria.upgrade.oldonly.MovedOldVectors.search_both`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from galleria.errors import FormatError
from galleria.store.gallery import Gallery
from galleria.types import SearchResult
from galleria.upgrade.merge import CohortNorm, cohort_stats
from galleria.upgrade.oldonly import MovedOldVectors
from galleria.upgrade.phi import PhiRidge
from galleria.upgrade.state import UpgradeError
from galleria.validate import l2_normalize

ENSEMBLE_DEPTH = 200
"""Candidates per query and per candidate list of the unmoved part (at least 4 k)."""
QUERY_CHUNK = 64
"""Queries scored together, at most (fewer when their candidate lists are long: the
candidate union of a chunk is at most :data:`CACHE_ROWS` rows, whatever ``k``)."""
CACHE_ROWS = 65536
"""Candidates of one search call whose old vector and phi are kept across chunks."""

Stats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def candidate_depth(k: int, depth: int = ENSEMBLE_DEPTH) -> int:
    """Candidates per list for a top-``k`` search: ``max(depth, 4 k)``."""
    return max(int(depth), 4 * int(k))


class EnsembleScorer:
    """``phi`` with the cohort statistics of rule ``ensemble`` (immutable once built).

    Args:
        phi: the forward map (old -> new) of the job.
        calibration: the job's :class:`CohortNorm` (``None`` or anything else: raw
            scores, every mean 0 and deviation 1, as rule ``both`` does then).
    """

    def __init__(self, phi: PhiRidge, calibration: object) -> None:
        self.phi = phi
        self.cohort = calibration if isinstance(calibration, CohortNorm) else None
        if self.cohort is not None:
            old = l2_normalize(np.asarray(self.cohort.old_cohort, np.float32))
            self.phi_cohort = phi.transform(old)  # (C, D_new), once per searcher
            self.raw_norm = float(np.linalg.norm(phi.raw(old), axis=1).mean())
        else:
            self.phi_cohort = None
            self.raw_norm = 1.0
        self.raw_norm = max(self.raw_norm, 1e-6)

    def stats(self, qo: np.ndarray, qn: np.ndarray) -> Stats:
        """``(mo, so, mn, sn, me, se)``, each ``(Q, 1)``."""
        if self.cohort is None:
            one = np.ones((len(qo), 1), np.float32)
            return 0 * one, one, 0 * one, one, 0 * one, one
        c = self.cohort
        mo, so = cohort_stats(qo, c.old_cohort, top=c.top)
        mn, sn = cohort_stats(qn, c.new_cohort, top=c.top)
        me, se = cohort_stats(qn, self.phi_cohort, top=c.top)
        return mo, so, mn, sn, me, se

    def surrogate(self, qo: np.ndarray, qn: np.ndarray, so: np.ndarray,
                  se: np.ndarray) -> np.ndarray:
        """``(Q, D_old)`` linear surrogate queries of the score (candidate generation)."""
        w, _ = self.phi.linear
        return l2_normalize((qo / so + (qn @ w) / (self.raw_norm * se)).astype(np.float32))

    def scores(self, qo: np.ndarray, qn: np.ndarray, old: np.ndarray, st: Stats,
               ghat: np.ndarray | None = None) -> np.ndarray:
        """``(Q, n)`` exact scores of items not moved yet, ``old`` their ``(n, D_old)``
        vectors (``ghat``: their ``phi``, computed when not given)."""
        mo, so, _, _, me, se = st
        if ghat is None:
            ghat = self.phi.transform(old)
        return (0.5 * ((qo @ old.T - mo) / so + (qn @ ghat.T - me) / se)).astype(np.float32)


def search_unmoved(scorer: EnsembleScorer, qo: np.ndarray, qn: np.ndarray, st: Stats,
                   view: object, depth: int,
                   fetch: Callable[[np.ndarray, np.ndarray], np.ndarray]
                   ) -> tuple[SearchResult, int]:
    """Items not moved yet (``view``: the old space) by their exact ensemble score.

    Args:
        qo, qn: ``(Q, D_old)`` / ``(Q, D_new)`` query embeddings.
        st: :meth:`EnsembleScorer.stats` of those queries.
        depth: candidates per list (two lists: surrogate and plain ``old(q)``).
        fetch: ``(keys (n,), ids (n,)) -> (n, D_old)`` old vectors of candidates;
            a row of NaN drops an item that left the gallery meanwhile.

    Returns:
        ``((Q, 2 depth)`` string-id result, unsorted, duplicates possible; ``phi``
        rows computed``)``.
    """
    nq = len(qo)
    count = getattr(view, "count", 0) if view is not None else 0
    if not count:
        return SearchResult.empty(nq, 1, object_ids=True), 0
    d = min(int(depth), int(count))
    _, so, _, _, _, se = st
    both = view.search(np.concatenate([scorer.surrogate(qo, qn, so, se), qo]), d)  # type: ignore[attr-defined]
    keys = np.concatenate([both.ids[:nq], both.ids[nq:]], axis=1)
    out = SearchResult.empty(nq, keys.shape[1], object_ids=True)
    cache = _Mapped()
    # queries per chunk: their candidate union (read and mapped at once) <= CACHE_ROWS rows
    step = max(1, min(QUERY_CHUNK, CACHE_ROWS // max(1, keys.shape[1])))
    for s in range(0, nq, step):
        e = min(nq, s + step)
        kc = keys[s:e]
        uniq = np.unique(kc[kc >= 0])
        if not uniq.size:
            continue
        ids = view.ids.lookup(uniq)  # type: ignore[attr-defined]
        old, ghat = cache.get(uniq, ids, fetch, scorer.phi)
        live = np.isfinite(old).all(axis=1)
        z = np.full((e - s, len(uniq)), -np.inf, np.float32)
        if live.any():
            sub = tuple(a[s:e] for a in st)
            z[:, live] = scorer.scores(qo[s:e], qn[s:e], old[live], sub,  # type: ignore[arg-type]
                                       ghat[live])
        pos = np.clip(np.searchsorted(uniq, kc), 0, len(uniq) - 1)
        sc = np.take_along_axis(z, pos, 1)
        valid = (kc >= 0) & (uniq[pos] == kc) & np.isfinite(sc)
        out.scores[s:e] = np.where(valid, sc, -np.inf)
        out.ids[s:e] = np.where(valid, ids[pos], None)
    return out, cache.mapped


class _Mapped:
    """Old vectors and their ``phi`` of the candidates of one search call, each read
    and mapped once across its query chunks (up to :data:`CACHE_ROWS` rows kept)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.old: np.ndarray | None = None
        self.ghat: np.ndarray | None = None
        self.mapped = 0

    def get(self, keys: np.ndarray, ids: np.ndarray,
            fetch: Callable[[np.ndarray, np.ndarray], np.ndarray], phi: PhiRidge
            ) -> tuple[np.ndarray, np.ndarray]:
        """``(old (n, D_old), ghat (n, D_new))`` of sorted unique ``keys``."""
        known = np.isin(keys, self.keys)
        fresh = ~known
        old = np.empty((len(keys), 0), np.float32)
        ghat = np.empty((len(keys), 0), np.float32)
        if fresh.any():
            o = fetch(keys[fresh], ids[fresh])
            live = np.isfinite(o).all(axis=1)
            g = np.full((len(o), phi.new_dim_), np.nan, np.float32)
            if live.any():
                g[live] = phi.transform(o[live])
            self.mapped += int(live.sum())
            old = np.empty((len(keys), o.shape[1]), np.float32)
            ghat = np.empty((len(keys), g.shape[1]), np.float32)
            old[fresh], ghat[fresh] = o, g
        if known.any():
            assert self.old is not None and self.ghat is not None
            rows = np.searchsorted(self.keys, keys[known])
            if not fresh.any():
                old = np.empty((len(keys), self.old.shape[1]), np.float32)
                ghat = np.empty((len(keys), self.ghat.shape[1]), np.float32)
            old[known], ghat[known] = self.old[rows], self.ghat[rows]
        if fresh.any() and len(self.keys) + int(fresh.sum()) <= CACHE_ROWS:
            allk = np.concatenate([self.keys, keys[fresh]])
            order = np.argsort(allk, kind="stable")
            prev_o = self.old if self.old is not None else old[:0]
            prev_g = self.ghat if self.ghat is not None else ghat[:0]
            self.keys = allk[order]
            self.old = np.concatenate([prev_o, old[fresh]])[order]
            self.ghat = np.concatenate([prev_g, ghat[fresh]])[order]
        return old, ghat


def read_old_vectors(gallery: Gallery, old_space: str, kept: MovedOldVectors | None,
                     keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``(n, D_old)`` stored old vectors of items of an old-space view.

    An item moved since that view was taken is read from the old vectors the job
    kept (written before the move); an item removed from the gallery meanwhile
    gets a row of NaN (dropped by :func:`search_unmoved`).
    """
    for _ in range(3):  # a move between the view and this read: look again
        try:
            return gallery.get_vectors(keys, space=old_space)
        except FormatError:
            pass
        kid, kold, _ = kept.load() if kept is not None else ([], None, None)
        row = {i: r for r, i in enumerate(kid)}
        here = np.asarray(gallery.has(list(ids), old_space), bool)
        from_kept = np.array([not h and i in row for h, i in zip(here, ids, strict=True)],
                             bool)
        out = np.full((len(keys), gallery.space_info(old_space).dim), np.nan, np.float32)
        if from_kept.any():
            assert kold is not None
            out[from_kept] = kold[[row[i] for i in ids[from_kept]]]
        try:
            if here.any():
                out[here] = gallery.get_vectors(keys[here], space=old_space)
            return out
        except FormatError:
            continue
    raise UpgradeError("rule ensemble: the old part kept changing while it was read")


def brute_force(scorer: EnsembleScorer, qo: np.ndarray, qn: np.ndarray, old: np.ndarray,
                new: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """``(Q, G)`` reference: the ensemble score of every item of a gallery held whole.

    Args:
        old: ``(G, D_old)`` old vectors of every item (moved ones: the kept ones).
        new: ``(G, D_new)`` new vectors (rows of unmoved items are ignored).
        moved: ``(G,)`` bool.
    """
    st = scorer.stats(qo, qn)
    mo, so, mn, sn, _, _ = st
    unmoved = scorer.scores(qo, qn, old, st)
    both = 0.5 * ((qo @ old.T - mo) / so + (qn @ new.T - mn) / sn)
    return np.where(np.asarray(moved, bool)[None, :], both, unmoved).astype(np.float32)
