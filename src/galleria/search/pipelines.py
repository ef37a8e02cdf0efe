"""Search pipelines over arrays: ``global``, ``global+sv``, ``local``, ``local+mds``.

Each pipeline is a small object holding parameters around pure cores
(:mod:`galleria.local.matching`, :mod:`galleria.rerank.mds`) and returns one
:class:`~galleria.types.SearchResult` of int64 keys. Inputs are a
:class:`QueryBatch` (global vectors and/or local features of the query
images) plus, where a pipeline re-ranks, callables that fetch gallery data by
key; nothing here knows about the gallery store.

``global``
    the global index alone.
``global+sv``
    the global top ``shortlist`` (100) re-ranked by spatial verification: MAGSAC++
    homography inliers of mutual-NN (or ratio-test) descriptor matches;
    score = inliers + a fraction from the global score (ties keep the global
    order); the rest keep the global order below.
``local``
    the local index (ASMK or CANN) alone.
``local+mds``
    local search, then MDS re-ranking (docs/methods.md, local-to-global): the query and its
    top ``candidates`` results are embedded by SMACOF from their local
    similarities (query-to-image from the search, image-to-image from a
    :meth:`~galleria.local.base.LocalIndex.pairwise`-capable index, ASMK), and
    the top ``k`` are re-ranked by cosine in that embedding, optionally blended
    with a global descriptor score; results past ``k`` keep the local order.

``hybrid``
    local-to-global that never loses to its parts: the union of the global top
    ``candidates`` and the local top ``candidates``; the local top ``verify`` and the
    global top ``verify`` are spatially verified (MAGSAC++ inliers, mutual +
    ratio-test matches) and those with at least ``min_inliers`` inliers come first,
    by inliers (a verified global top-1 stays first unless significantly out-verified,
    ``keep_first``); the rest follow by a fused score in which unverified local scores
    carry ``local_weight`` (0 by default: the global order), optionally re-ranked by
    the MDS embedding of the fused similarity (``mds_k``); the global rest below
    (:mod:`galleria.local.hybrid`). The default pipeline of a gallery with a global
    and a local space.

Scores of re-ranked pipelines are monotone in the returned order but are not
similarities of one scale across pipelines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np

from galleria.errors import InputError
from galleria.local.base import LocalIndex
from galleria.local.hybrid import (
    fused_pairwise,
    fused_scores,
    to_unit,
    verified_order,
    verify_shortlist,
)
from galleria.local.matching import MATCHERS, verify_pairs
from galleria.rerank.mds import PAPER_P, floor_unmatched, mds_rerank_scores, scaled_defaults
from galleria.types import MISSING_KEY, LocalFeatures, SearchResult

log = logging.getLogger(__name__)

PIPELINES = ("global", "global+sv", "local", "local+mds", "hybrid")

FetchLocal = Callable[[np.ndarray], Sequence[LocalFeatures]]
"""``keys (n,) -> n LocalFeatures`` of gallery images."""
FetchVectors = Callable[[np.ndarray], np.ndarray]
"""``keys (n,) -> (n, D)`` global vectors of gallery images."""


class VectorIndex(Protocol):
    def search(self, queries: np.ndarray, k: int) -> SearchResult: ...


@dataclass(frozen=True)
class QueryBatch:
    """``Q`` query images.

    Attributes:
        vectors: ``(Q, D)`` global embeddings (``global``, ``global+sv``, blend).
        local: ``Q`` LocalFeatures (``global+sv``, ``local``, ``local+mds``).
        exclude: ``(Q,)`` int64, a key to leave out of each query's results
            (the query itself in leave-one-out evaluation), ``-1`` for none.
    """

    vectors: np.ndarray | None = None
    local: Sequence[LocalFeatures] | None = None
    exclude: np.ndarray | None = None

    def __len__(self) -> int:
        if self.vectors is not None:
            return int(np.asarray(self.vectors).shape[0])
        return len(self.local) if self.local is not None else 0

    def need_vectors(self, who: str) -> np.ndarray:
        if self.vectors is None:
            raise InputError(f"the {who} pipeline needs global query vectors")
        return np.asarray(self.vectors, np.float32)

    def need_local(self, who: str) -> list[LocalFeatures]:
        if self.local is None:
            raise InputError(f"the {who} pipeline needs local query features")
        return list(self.local)

    def excluded(self) -> np.ndarray:
        q = len(self)
        if self.exclude is None:
            return np.full(q, MISSING_KEY, np.int64)
        e = np.asarray(self.exclude, np.int64).reshape(-1)
        if e.shape != (q,):
            raise InputError(f"exclude must have one key per query ({q}); got {e.shape}")
        return e


def _drop_excluded(res: SearchResult, exclude: np.ndarray, k: int) -> SearchResult:
    """Remove each row's excluded key and keep ``k`` columns (padding as needed)."""
    if not (exclude >= 0).any():
        return res.pad(k)
    out = SearchResult.empty(len(res), k)
    for i in range(len(res)):
        keep = res.ids[i] != exclude[i] if exclude[i] >= 0 else np.ones(res.k, bool)
        ids, sc = res.ids[i][keep][:k], res.scores[i][keep][:k]
        out.ids[i, : ids.size], out.scores[i, : ids.size] = ids, sc
    return out


def _wanted(exclude: np.ndarray, k: int) -> int:
    return k + int((exclude >= 0).any())


class GlobalPipeline:
    """``global``: the global index alone."""

    name = "global"

    def __init__(self, index: VectorIndex) -> None:
        self.index = index

    def search(self, queries: QueryBatch, k: int) -> SearchResult:
        ex = queries.excluded()
        res = self.index.search(queries.need_vectors(self.name), _wanted(ex, k))
        return _drop_excluded(res, ex, k)


class GlobalSVPipeline:
    """``global+sv``: global shortlist re-ranked by MAGSAC++ homography inliers.

    Args:
        index: global index (``search((Q, D), k)``).
        fetch_local: local features of gallery images by key.
        shortlist: global results verified per query.
        matcher: ``mutual``, ``ratio`` or ``mutual+ratio``; ``ratio``: Lowe's ratio.
        threshold: MAGSAC threshold (pixels); ``max_iters``: its iteration cap.
    """

    name = "global+sv"

    def __init__(self, index: VectorIndex, fetch_local: FetchLocal, *, shortlist: int = 100,
                 matcher: str = "mutual", ratio: float = 0.8, threshold: float = 6.0,
                 max_iters: int = 2000) -> None:
        if matcher not in MATCHERS:
            raise InputError(f"matcher must be one of {MATCHERS}; got {matcher!r}")
        if shortlist < 1:
            raise InputError("shortlist must be >= 1")
        self.index, self.fetch_local = index, fetch_local
        self.shortlist, self.matcher, self.ratio = int(shortlist), matcher, float(ratio)
        self.threshold, self.max_iters = float(threshold), int(max_iters)

    def params(self) -> dict[str, Any]:
        return {"shortlist": self.shortlist, "matcher": self.matcher, "ratio": self.ratio,
                "threshold": self.threshold, "max_iters": self.max_iters}

    def search(self, queries: QueryBatch, k: int) -> SearchResult:
        ex = queries.excluded()
        vecs = queries.need_vectors(self.name)
        width = max(k, self.shortlist)
        res = _drop_excluded(self.index.search(vecs, _wanted(ex, width)), ex, width)
        return self.rerank(queries, res, k)

    def rerank(self, queries: QueryBatch, result: SearchResult, k: int) -> SearchResult:
        """Re-rank a global ``result`` (best first, scores = cosine) -> ``(Q, k)``."""
        local = queries.need_local(self.name)
        if len(local) != len(result):
            raise InputError(f"{len(local)} query features for {len(result)} result rows")
        out = SearchResult.empty(len(result), k)
        for i in range(len(result)):
            ids, g = result.ids[i], result.scores[i].astype(np.float64)
            valid = ids >= 0
            ids, g = ids[valid], g[valid]
            frac = (np.clip(g, -1.0, 1.0) + 1.0) / 2.001  # in [0, 1): keeps the global order
            head = min(self.shortlist, ids.size)
            inl = verify_pairs(local[i], list(self.fetch_local(ids[:head])), method=self.matcher,
                               ratio=self.ratio, threshold=self.threshold,
                               max_iters=self.max_iters)
            score = frac - 1.0
            score[:head] = inl + frac[:head]
            order = np.argsort(-score, kind="stable")[:k]
            out.ids[i, : order.size] = ids[order]
            out.scores[i, : order.size] = score[order]
        return out


class LocalPipeline:
    """``local``: the local index (ASMK or CANN) alone."""

    name = "local"

    def __init__(self, index: LocalIndex) -> None:
        self.index = index

    def search(self, queries: QueryBatch, k: int) -> SearchResult:
        ex = queries.excluded()
        res = self.index.search(queries.need_local(self.name), _wanted(ex, k))
        return _drop_excluded(res, ex, k)


#: Options of ``local+mds`` and their defaults (see :class:`LocalMDSPipeline`).
MDS_DEFAULTS: dict[str, Any] = {"k": None, "candidates": None, "p": PAPER_P, "dim": 32,
                                "max_iter": 100, "blend": 0.0, "local_blend": 0.5,
                                "evidence": 3.0}


class LocalMDSPipeline:
    """``local+mds``: local search re-ranked by an on-the-fly MDS embedding.

    Args:
        index: the local index searched.
        similarity: index giving image-to-image similarities (``pairwise``);
            default ``index`` (an ASMK index has it).
        k: results re-ranked; ``candidates``: results embedded (>= k). ``None``:
            the paper's 700 / 1,600 scaled to the gallery size
            (:func:`~galleria.rerank.mds.scaled_defaults`).
        p: exponent of ``D = 1 - S^p`` (paper: 0.01).
        dim: embedding dimension; ``max_iter``: SMACOF iterations.
        blend: weight of the global score (paper: 0.19); needs ``fetch_vectors``
            and query vectors.
        fetch_vectors: global vectors of gallery images by key.
        local_blend: weight of the normalised local score in the new score (0.5; 0: the
            paper's MDS cosine alone).
        evidence: only candidates whose local score stands more than ``evidence``
            standard deviations above the mean of the candidates are embedded (3; 0:
            every positive one). An embedding of hundreds of unrelated candidates
            carries no signal: on the 11.4k gallery the cosines of a query's true
            matches ranked anywhere among the 1,600 embedded.
    """

    name = "local+mds"

    def __init__(self, index: LocalIndex, *, similarity: LocalIndex | None = None,
                 fetch_vectors: FetchVectors | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(MDS_DEFAULTS))
        if unknown:
            raise InputError(f"local+mds takes {list(MDS_DEFAULTS)}; unknown: {unknown}")
        o = {**MDS_DEFAULTS, **options}
        k, candidates, p, dim, max_iter = (o["k"], o["candidates"], o["p"], o["dim"],
                                           o["max_iter"])
        blend, local_blend, evidence = o["blend"], o["local_blend"], o["evidence"]
        if blend and fetch_vectors is None:
            raise InputError("blend > 0 needs fetch_vectors (global vectors of the gallery)")
        if not 0.0 <= blend <= 1.0:
            raise InputError(f"blend must be in [0, 1]; got {blend}")
        if not 0.0 <= local_blend <= 1.0:
            raise InputError(f"local_blend must be in [0, 1]; got {local_blend}")
        self.index = index
        self.similarity = similarity if similarity is not None else index
        self.k, self.candidates = k, candidates
        self.p, self.dim, self.max_iter = float(p), int(dim), int(max_iter)
        self.blend, self.fetch_vectors = float(blend), fetch_vectors
        self.local_blend = float(local_blend)
        if evidence < 0:
            raise InputError(f"evidence must be >= 0; got {evidence}")
        self.evidence = float(evidence)

    def sizes(self) -> tuple[int, int]:
        """``(k, candidates)`` in effect for the current gallery size."""
        dk, dc = scaled_defaults(len(self.index))
        k = self.k if self.k is not None else dk
        c = self.candidates if self.candidates is not None else max(dc, k)
        return int(k), int(max(c, k))

    def params(self) -> dict[str, Any]:
        k, c = self.sizes()
        return {"k": k, "candidates": c, "p": self.p, "dim": self.dim,
                "max_iter": self.max_iter, "blend": self.blend, "local_blend": self.local_blend,
                "evidence": self.evidence}

    def search(self, queries: QueryBatch, k: int) -> SearchResult:
        ex = queries.excluded()
        local = queries.need_local(self.name)
        width = max(k, self.sizes()[1])
        res = _drop_excluded(self.index.search(local, _wanted(ex, width)), ex, width)
        return self.rerank(queries, res, k)

    def rerank(self, queries: QueryBatch, result: SearchResult, k: int) -> SearchResult:
        """Re-rank a local ``result`` (best first, scores = local similarities) -> ``(Q, k)``.

        Only candidates with a positive local similarity are embedded: a zero-score
        candidate (no visual word in common with the query, e.g. a featureless image
        filling a long candidate list) would sit at distance 1 from everything under
        ``D = 1 - S^p`` with ``p = 0.01`` while every scored candidate sits within
        0.1 of the query; hundreds of such points form a unit simplex that takes every
        dimension of the embedding and leaves the query's neighbourhood to noise (the
        R@1 0 % collapse on the 11,398-image gallery). Among the embedded candidates a
        pairwise similarity of 0 is raised to the smallest positive one
        (:func:`~galleria.rerank.mds.floor_unmatched`: the same collapse from pairs of
        candidates with no word in common, 100 covers + 400 unrelated images). With
        ``local_blend > 0`` the new score is ``(1 - local_blend) * (cos + 1) / 2 +
        local_blend * s / s_max``: both terms in [0, 1], so embedding noise cannot undo
        a local margin of many times (the local evidence guards the order where
        similarities are too sparse to embed).
        """
        vecs = queries.need_vectors(self.name) if self.blend else None
        kr, cand = self.sizes()
        out = SearchResult.empty(len(result), k)
        for i in range(len(result)):
            ids, s = result.ids[i], result.scores[i].astype(np.float64)
            valid = (ids >= 0) & np.isfinite(s)
            ids, s = ids[valid], s[valid]
            n_pos = int(np.count_nonzero(s[: min(cand, ids.size)] > 0))
            n_emb = min(cand, n_pos)
            if self.evidence and n_emb > 2:  # only candidates standing out of the crowd
                sc = s[:n_emb]
                n_emb = int(np.count_nonzero(sc > sc.mean() + self.evidence * sc.std()))
            n_re = min(kr, n_emb)
            if n_re >= 2:
                emb = ids[:n_emb]
                pair = floor_unmatched(s[:n_emb], self.similarity.pairwise(emb))
                glob = None
                if vecs is not None:
                    assert self.fetch_vectors is not None
                    glob = np.asarray(self.fetch_vectors(emb), np.float32) @ vecs[i]
                new = mds_rerank_scores(s[:n_emb], pair, p=self.p, dim=self.dim,
                                        max_iter=self.max_iter, global_scores=glob,
                                        blend=self.blend)[:n_re].astype(np.float64)
                if self.local_blend:  # both terms in [0, 1]
                    new = ((1.0 - self.local_blend) * (new + 1.0) / 2.0
                           + self.local_blend * s[:n_re] / s[0])
                order = np.argsort(-new, kind="stable")
                ids = np.concatenate([ids[:n_re][order], ids[n_re:]])
                tail = s[n_re:]
                top = np.max(tail) if tail.size else 0.0
                # past k: the local order, below every re-ranked score
                s = np.concatenate([new[order], new.min() - 1.0 - (top - tail)])
            m = min(k, ids.size)
            out.ids[i, :m], out.scores[i, :m] = ids[:m], s[:m]
        return out


@dataclass(frozen=True)
class HybridConfig:
    """Options of the ``hybrid`` pipeline (see :mod:`galleria.local.hybrid`).

    Attributes:
        candidates: shortlist of each source (global and local); the union is ranked.
        verify: the local top ``verify`` and the global top ``verify`` are spatially
            verified (0: no verification: the fused order alone).
        min_inliers: MAGSAC++ inliers a verified candidate needs to come first (a pair
            with fewer tentative matches is skipped).
        order_verified: verified candidates by ``inliers`` or in the ``fused`` order.
        keep_first: when the first candidate of the fused order (the global top-1)
            verifies, another verified candidate comes before it only with more inliers
            by more than ``keep_first`` standard deviations of the difference of two
            counts (:func:`~galleria.local.hybrid.overturns`; 0: any more inliers;
            with ``order_verified = "inliers"``).
        matcher: tentative matches of the verification (``mutual+ratio``: mutual nearest
            neighbours passing Lowe's ``ratio``); ``sv_threshold``: MAGSAC threshold in
            pixels; ``max_iters``: its iteration cap.
        local_weight: weight of the unverified local evidence in the fused order
            (0: the global order).
        threshold: standard deviations above a source's own shortlist where its
            evidence starts; ``tie``: weight of the standardised global score.
        mds_k: fused top results re-ranked by the MDS embedding of the fused
            similarity (0: off); ``mds_weight`` its weight against the fused score
            (both mapped to ``(0, 1)``); ``p``, ``dim``, ``max_iter``: the MDS.
    """

    candidates: int = 100
    verify: int = 20
    min_inliers: int = 10
    order_verified: str = "inliers"
    keep_first: float = 0.0
    matcher: str = "mutual+ratio"
    ratio: float = 0.8
    sv_threshold: float = 6.0
    max_iters: int = 1000
    local_weight: float = 0.0
    threshold: float = 3.0
    tie: float = 0.01
    mds_k: int = 0
    mds_weight: float = 0.5
    p: float = 1.0
    dim: int = 32
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.mds_k < 0 or self.verify < 0 or self.max_iters < 1:
            raise InputError("candidates and max_iters must be >= 1, mds_k and verify >= 0")
        if self.min_inliers < 4:
            raise InputError(f"min_inliers must be >= 4 (a homography); got {self.min_inliers}")
        if not self.keep_first >= 0:
            raise InputError(f"keep_first must be >= 0; got {self.keep_first}")
        if not (0.0 <= self.mds_weight <= 1.0 and self.local_weight >= 0 and self.p > 0
                and self.threshold >= 0 and self.tie >= 0 and 0 < self.ratio <= 1):
            raise InputError("need 0 <= mds_weight <= 1, p > 0, 0 < ratio <= 1 and "
                             "local_weight, threshold, tie >= 0")
        if self.matcher not in MATCHERS:
            raise InputError(f"matcher must be one of {MATCHERS}; got {self.matcher!r}")


HYBRID_OPTIONS = tuple(f.name for f in fields(HybridConfig))


class HybridPipeline:
    """``hybrid``: global and local candidates, verified ones first (module docstring).

    Args:
        index: global index (``search((Q, D), k)``).
        local_index: local index (ASMK or CANN).
        fetch_vectors: global vectors of gallery images by key (scores every candidate).
        similarity: index giving image-to-image local similarities for the MDS step
            (default ``local_index``; needs ``pairwise``).
        fetch_local: local features of gallery images by key (the verification; needed
            when ``verify > 0``).
        config: :class:`HybridConfig`; keyword ``options`` replace its fields.
    """

    name = "hybrid"

    def __init__(self, index: VectorIndex, local_index: LocalIndex, fetch_vectors: FetchVectors,
                 *, similarity: LocalIndex | None = None, fetch_local: FetchLocal | None = None,
                 config: HybridConfig | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(HYBRID_OPTIONS))
        if unknown:
            raise InputError(f"hybrid takes {list(HYBRID_OPTIONS)}; unknown: {unknown}")
        self.config = replace(config or HybridConfig(), **options)
        if self.config.verify and fetch_local is None:
            raise InputError("hybrid with verify > 0 needs fetch_local (gallery local features)")
        self.index, self.local_index, self.fetch_vectors = index, local_index, fetch_vectors
        self.similarity = similarity if similarity is not None else local_index
        self.fetch_local = fetch_local
        self.verified_pairs = 0  # pairs spatially verified so far (a cost counter)
        #: a list to record each query's ``(ids, fused score, inliers)`` before the verified
        #: ordering (diagnostics, ``benchmarks/bench_hybrid_order.py``); ``None``: off
        self.trace: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def params(self) -> dict[str, Any]:
        return {f: getattr(self.config, f) for f in HYBRID_OPTIONS}

    def search(self, queries: QueryBatch, k: int) -> SearchResult:
        cfg = self.config
        ex = queries.excluded()
        vecs = queries.need_vectors(self.name)
        local = queries.need_local(self.name)
        c = cfg.candidates
        width = max(k, c)
        gres = _drop_excluded(self.index.search(vecs, _wanted(ex, width)), ex, width)
        lres = _drop_excluded(self.local_index.search(local, _wanted(ex, c)), ex, c)
        out = SearchResult.empty(len(queries), k)
        for i in range(len(queries)):
            ids, sc = self._one(vecs[i], local[i], gres.ids[i], gres.scores[i],
                                lres.ids[i], lres.scores[i])
            m = min(k, ids.size)
            out.ids[i, :m], out.scores[i, :m] = ids[:m], sc[:m]
        return out

    def _one(self, vec: np.ndarray, feat: LocalFeatures, gids: np.ndarray, gsc: np.ndarray,
             lids: np.ndarray, lsc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query: ``(ids, scores)`` best first over the global list and the local
        shortlist (a local candidate outside the global list is scored by its vector)."""
        cfg = self.config
        gok, lok = gids >= 0, (lids >= 0) & np.isfinite(lsc)
        gids, gsc, lids, lsc = gids[gok], gsc[gok].astype(np.float64), lids[lok], lsc[lok]
        gref, lref = gsc[: cfg.candidates], lsc.astype(np.float64)
        extra = lids[~np.isin(lids, gids)]
        ids = np.concatenate([gids, extra])
        if ids.size == 0:
            return gids, gsc
        g = np.concatenate([gsc, np.asarray(self.fetch_vectors(extra), np.float32) @ vec
                            if extra.size else np.zeros(0)])
        loc = np.full(ids.size, float(lref.min()) if lref.size else 0.0)
        srt = np.argsort(ids, kind="stable")
        loc[srt[np.searchsorted(ids[srt], lids)]] = lref
        z = fused_scores(g, loc, global_ref=gref, local_ref=lref,
                         local_weight=cfg.local_weight, threshold=cfg.threshold, tie=cfg.tie)
        order = np.argsort(-z, kind="stable")
        ids, score = ids[order], z[order]
        if cfg.mds_k >= 2 and ids.size >= 2:
            ids, score = self._mds(vec, ids, score, gref, lref)
        if cfg.verify:
            ids, score = self._verified(feat, ids, score, gids, lids)
        return ids, score

    def _mds(self, vec: np.ndarray, ids: np.ndarray, score: np.ndarray, gref: np.ndarray,
             lref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank the top ``mds_k`` by MDS of the fused similarity, blended with ``score``
        (unmatched pairs floored: :func:`~galleria.rerank.mds.floor_unmatched`; the cosine
        mapped to ``[0, 1]``)."""
        cfg = self.config
        n = min(cfg.mds_k, ids.size)
        head = ids[:n]
        gv = np.asarray(self.fetch_vectors(head), np.float32)
        q = to_unit(score[:n])
        # a pair without evidence (similarity 0) is "no evidence", not "maximally
        # different": floored at the smallest positive similarity, as in local+mds
        pair = floor_unmatched(q, fused_pairwise(
            gv @ gv.T, self.similarity.pairwise(head), global_ref=gref, local_ref=lref,
            local_weight=cfg.local_weight, threshold=cfg.threshold, tie=cfg.tie))
        cos = mds_rerank_scores(q, pair, p=cfg.p, dim=cfg.dim,
                                max_iter=cfg.max_iter).astype(np.float64)
        new = (1.0 - cfg.mds_weight) * q + cfg.mds_weight * (cos + 1.0) / 2.0
        o = np.argsort(-new, kind="stable")
        # past mds_k: the fused order, below every re-ranked score
        rest = score[n:]
        rest = new.min() - 1.0 - (rest.max() - rest) if rest.size else rest
        return np.concatenate([head[o], ids[n:]]), np.concatenate([new[o], rest])

    def _verified(self, feat: LocalFeatures, ids: np.ndarray, score: np.ndarray,
                  gids: np.ndarray, lids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Verify the local and global top ``verify``; verified first (by inliers)."""
        cfg = self.config
        assert self.fetch_local is not None
        want = np.unique(np.concatenate([lids[: cfg.verify], gids[: cfg.verify]]))
        at = np.flatnonzero(np.isin(ids, want))
        inl = np.zeros(ids.size, np.int32)
        if at.size:
            inl[at] = verify_shortlist(feat, list(self.fetch_local(ids[at])),
                                       min_matches=cfg.min_inliers, method=cfg.matcher,
                                       ratio=cfg.ratio, threshold=cfg.sv_threshold,
                                       max_iters=cfg.max_iters)
            self.verified_pairs += int(at.size)
        if self.trace is not None:
            self.trace.append((ids.copy(), score.copy(), inl.copy()))
        o, new = verified_order(score, inl, cfg.min_inliers, by=cfg.order_verified,
                                keep_first=cfg.keep_first)
        return ids[o], new


def make_pipeline(name: str, **parts: Any) -> Any:
    """Build a pipeline by name from its parts (see each class for the arguments)."""
    classes = {"global": GlobalPipeline, "global+sv": GlobalSVPipeline,
               "local": LocalPipeline, "local+mds": LocalMDSPipeline,
               "hybrid": HybridPipeline}
    if name not in classes:
        raise InputError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    return classes[name](**parts)
