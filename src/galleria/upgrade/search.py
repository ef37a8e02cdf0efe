"""Search a gallery while it is being backfilled, with a selectable merge rule.

The gallery's items are split between the old space (not yet re-embedded) and
the new space (backfilled). :class:`BackfillSearcher` searches both parts and
merges the two lists (:func:`galleria.upgrade.merge.merge_results`):

=====================  ===================================  =========================
rule                   old part searched with               merge scale (default)
=====================  ===================================  =========================
``naive``              ``old(q)``                           raw cosine
``rank-merge``         ``old(q)``                           adaptive Z-norm (cohort)
``psi``                ``psi(new(q))`` (regression psi)     adaptive Z-norm (cohort)
``fused``              ``norm(old(q) + w psi(new(q)))``     adaptive Z-norm (cohort)
``metric-compatible``  ``psi_mc(new(q))`` (contrastive)     raw (trained to be)
``old-only``           ``old(q)``, old space only (shadow mode baseline)
=====================  ===================================  =========================

The new part is always searched with ``new(q)``. ``naive``, ``rank-merge`` and
``fused`` run two models per query; ``psi`` and ``metric-compatible`` run one
model plus a small MLP. ``fused`` searches the old part with a query-side
ensemble of both descriptions in the old space (``w`` = :data:`FUSE_WEIGHT`):
it keeps the old model's answers where psi is unsure (fewer negative flips than
psi) and gains where psi is better than the old model.
Normalisations (``--calibration``): ``znorm-top`` (default; per-query Z-norm
against the 100 most similar cohort images, :class:`~galleria.upgrade.merge.CohortNorm`),
``znorm`` (whole cohort), ``quantile``, ``affine`` (global maps,
:func:`~galleria.upgrade.merge.fit_calibration`), ``identity``. The cohort and
the global maps come from the (old, new) pairs the backfill job keeps
(:class:`galleria.upgrade.job.PairStore`); with fewer than :data:`MIN_PAIRS`
pairs, psi rules fall back to the quantile map stored with psi, the others to
raw scores. Measured in benchmarks/results/backfill.md. :class:`QueryCost`
records forward passes, index searches and milliseconds per stage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.extract.queries import Queries, QueryFailure
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.search.contract import Searcher, SearchOptions
from galleria.store.gallery import Gallery
from galleria.types import SearchResult, clamp_k
from galleria.upgrade.merge import (
    Calibration,
    CohortNorm,
    ScoreMap,
    fit_calibration,
    merge_results,
)
from galleria.upgrade.pairs import load_pairs
from galleria.upgrade.psi import CrossModelMap, load_cross_map
from galleria.upgrade.state import UpgradeError, UpgradeState, require_upgrade, transform_path
from galleria.validate import as_embeddings, l2_normalize

log = logging.getLogger(__name__)

RULES = ("auto", "naive", "rank-merge", "psi", "fused", "metric-compatible", "old-only")
FUSE_WEIGHT = 0.5
"""Weight of ``psi(new(q))`` next to ``old(q)`` in the fused old-part query (set a priori)."""
NORMALIZATIONS = ("znorm-top", "znorm", "quantile", "affine", "identity")
COHORT_TOP = 100
MIN_PAIRS = 50
"""Fewer job pairs than this: use the psi artifact's stored calibration instead."""
TRANSFORM_OF_RULE = {"psi": "regression", "fused": "regression",
                     "metric-compatible": "metric-compatible"}
OLD_MODEL_RULES = ("naive", "rank-merge", "fused", "old-only")


@dataclass
class QueryCost:
    """What answering a batch of queries cost."""

    queries: int = 0
    forward_passes: dict[str, int] = field(default_factory=dict)
    map_calls: int = 0
    index_searches: int = 0
    ms: dict[str, float] = field(default_factory=dict)

    def add_ms(self, stage: str, seconds: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + 1000.0 * seconds

    def per_query(self) -> dict[str, Any]:
        q = max(self.queries, 1)
        return {
            "queries": self.queries,
            "forward_passes_per_query": sum(self.forward_passes.values()) / q,
            "forward_passes": dict(self.forward_passes),
            "map_calls_per_query": self.map_calls / q,
            "index_searches_per_query": self.index_searches / q,
            "ms_per_query": {k: round(v / q, 3) for k, v in self.ms.items()},
            "total_ms_per_query": round(sum(self.ms.values()) / q, 3),
        }


def resolve_rule(rule: str, gallery: Gallery, state: UpgradeState) -> str:
    """``auto``: old-only in shadow mode; fused when the job has a regression psi;
    else rank-merge. (metric-compatible is never chosen automatically: its gains
    come from the labels it was trained with and did not transfer across domains
    in the benchmark; ask for it by name. psi is the one-pass option.)"""
    if rule not in RULES:
        raise InputError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    if rule != "auto":
        return rule
    if state.mode == "shadow":
        return "old-only"
    p = transform_path(gallery, state, TRANSFORM_OF_RULE["psi"])
    if p is not None and p.exists():
        return "fused"
    return "rank-merge"


class BackfillSearcher(Searcher):
    """Search both parts of a gallery under upgrade and merge them with one rule.

    Build it with :meth:`open` (rebuilds the models from the gallery's recipes,
    loads the job's psi and calibration pairs) or directly with the pieces.

    Args:
        gallery: the gallery under upgrade.
        rule: one of :data:`RULES` (``auto`` resolved with :func:`resolve_rule`).
        old_extractor: old model (``naive``, ``rank-merge``, ``old-only``).
        new_extractor: new model (every rule except ``old-only``).
        psi: the map of the psi rules (checked against the job's models).
        calibration: global score maps of the two parts, or a
            :class:`CohortNorm` (per-query); default identity.
    """

    kind = "backfill"

    def __init__(
        self,
        gallery: Gallery,
        *,
        rule: str = "auto",
        old_extractor: Extractor | None = None,
        new_extractor: Extractor | None = None,
        psi: CrossModelMap | None = None,
        calibration: Calibration | CohortNorm | None = None,
    ) -> None:
        self.gallery = gallery
        self.state = require_upgrade(gallery)
        self.rule = resolve_rule(rule, gallery, self.state)
        if self.state.mode == "shadow" and self.rule != "old-only":
            raise UpgradeError(
                "in shadow mode the backfilled items keep their old vectors: search with "
                "rule old-only until `galleria upgrade finish`"
            )
        if self.state.mode == "online" and self.rule == "old-only":
            raise UpgradeError(
                "rule old-only needs a shadow-mode upgrade (online mode moves items out of "
                "the old space, so old-only would miss them)"
            )
        if self.rule in TRANSFORM_OF_RULE:
            if psi is None:
                raise UpgradeError(f"rule {self.rule!r} needs a trained psi map")
            psi.check_models(old=self.state.old_space, new=self.state.new_space)
        self.psi = psi
        self.old_extractor = old_extractor
        self.new_extractor = new_extractor
        for ext, space, what in ((old_extractor, self.state.old_space, "old"),
                                 (new_extractor, self.state.new_space, "new")):
            if ext is not None and ext.fingerprint != space:
                raise UpgradeError(
                    f"the {what} query model makes {ext.fingerprint!r}, the gallery's {what} "
                    f"space is {space!r}"
                )
        self.calibration = calibration or Calibration.identity()
        self.cost = QueryCost()

    @property
    def spaces(self) -> list[str]:  # type: ignore[override]
        """The query spaces the rule needs: old and/or new."""
        need_old, need_new = self.needs()
        return [s for s, n in ((self.state.old_space, need_old),
                               (self.state.new_space, need_new)) if n]

    @property
    def models(self) -> dict[str, Extractor]:  # type: ignore[override]
        out = {}
        if self.old_extractor is not None:
            out[self.state.old_space] = self.old_extractor
        if self.new_extractor is not None:
            out[self.state.new_space] = self.new_extractor
        return out

    @models.setter
    def models(self, value: dict[str, Extractor]) -> None:
        self.old_extractor = value.get(self.state.old_space)
        self.new_extractor = value.get(self.state.new_space)

    def read_spaces(self) -> list[str]:
        return [self.state.old_space, self.state.new_space]

    def describe(self) -> dict[str, Any]:
        cal = self.calibration
        info = dict(cal.info) if hasattr(cal, "info") else {}
        return {**super().describe(), "model": self.state.new_space, "pipeline": "global",
                "merge": {"rule": self.rule, "old_space": self.state.old_space,
                          "new_space": self.state.new_space, "calibration": info}}

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | Gallery,
        *,
        rule: str = "auto",
        psi: str | os.PathLike[str] | None = None,
        calibration: str | None = None,
        runtime: str = "auto",
        threads: int | None = None,
        with_models: bool = True,
    ) -> BackfillSearcher:
        """Open a gallery under upgrade for search (``with_models=False``: query vectors only).

        Args:
            rule: merge rule (:data:`RULES`).
            psi: a trained map folder (default: the job's map for the rule).
            calibration: one of :data:`NORMALIZATIONS` (default ``znorm-top``
                for rank-merge and psi, ``identity`` for the others).
        """
        gallery = path if isinstance(path, Gallery) else Gallery.open(path)
        state = require_upgrade(gallery)
        rule = resolve_rule(rule, gallery, state)
        needs_old = rule in OLD_MODEL_RULES and with_models
        needs_new = rule != "old-only" and with_models
        old_ext = (extractor_from_space(gallery.space_info(state.old_space).info,
                                        root=gallery.path, runtime=runtime, threads=threads,
                                        query=True) if needs_old else None)
        new_ext = (extractor_from_space(gallery.space_info(state.new_space).info,
                                        root=gallery.path, runtime=runtime, threads=threads,
                                        query=True) if needs_new else None)
        the_map = None
        if rule in TRANSFORM_OF_RULE:
            p = Path(psi) if psi is not None else transform_path(
                gallery, state, TRANSFORM_OF_RULE[rule])
            if p is None:
                raise UpgradeError(
                    f"rule {rule!r} needs a trained map: run `galleria upgrade train-transform "
                    f"INDEX --kind {TRANSFORM_OF_RULE[rule]} ...` or pass --psi DIR"
                )
            the_map = load_cross_map(p, old_fingerprint=state.old_space,
                                     new_fingerprint=state.new_space)
        kind = calibration or (
            "znorm-top" if rule in ("rank-merge", "psi", "fused") else "identity")
        cal = job_calibration(gallery, kind, psi=the_map if rule in TRANSFORM_OF_RULE else None)
        return cls(gallery, rule=rule, old_extractor=old_ext, new_extractor=new_ext,
                   psi=the_map, calibration=cal)

    # ---------------------------------------------------------------- search
    def needs(self) -> tuple[bool, bool]:
        """Which query embeddings the rule needs: ``(old model, new model)``."""
        return self.rule in OLD_MODEL_RULES, self.rule != "old-only"

    def search_vectors(
        self,
        *,
        new_queries: np.ndarray | None = None,
        old_queries: np.ndarray | None = None,
        k: int = 10,
    ) -> SearchResult:
        """Top-``k`` string ids for query embeddings of the models the rule needs.

        Args:
            new_queries: ``(Q, D_new)`` new-model query embeddings.
            old_queries: ``(Q, D_old)`` old-model query embeddings (rules
                ``naive``, ``rank-merge``, ``fused``, ``old-only``).
        """
        if k <= 0:
            raise InputError(f"k must be positive, got {k}")
        need_old, need_new = self.needs()
        old_space, new_space = self.state.old_space, self.state.new_space
        qn = np.zeros((0, 0), np.float32)
        if need_new:
            if new_queries is None:
                raise InputError(f"rule {self.rule!r} needs new-model query embeddings")
            qn = as_embeddings(new_queries, name="new_queries")
        if need_old and old_queries is None:
            raise InputError(f"rule {self.rule!r} needs old-model query embeddings")
        if self.rule in TRANSFORM_OF_RULE:
            assert self.psi is not None
            t = time.perf_counter()
            qo = self.psi.transform(qn, fingerprint=new_space)
            if self.rule == "fused":
                qo = fuse_queries(as_embeddings(old_queries, name="old_queries"), qo)
            self.cost.add_ms("psi", time.perf_counter() - t)
            self.cost.map_calls += len(qn)
        else:
            qo = as_embeddings(old_queries, name="old_queries")
        nq = len(qo)
        self.cost.queries += nq
        t = time.perf_counter()
        # both parts from one committed state: an item moving meanwhile is in exactly one
        views = self.gallery.views([old_space, new_space])
        old_res = self._search_part(qo, k, views.get(old_space))
        # k is clamped to the items searched, as every searcher does
        kk = clamp_k(k, sum(v.count for v in views.values()))
        if self.rule == "old-only":
            self.cost.add_ms("search", time.perf_counter() - t)
            ov = views.get(old_space)
            old_res = old_res.head(clamp_k(k, ov.count if ov is not None else 0))
            return SearchResult(old_res.scores, old_res.ids,
                                {sp: v.generation for sp, v in views.items()})
        if len(qn) != nq:
            raise InputError(f"{nq} old-side queries but {len(qn)} new-side queries")
        new_res = self._search_part(qn, k, views.get(new_space))
        self.cost.add_ms("search", time.perf_counter() - t)
        t = time.perf_counter()
        if isinstance(self.calibration, CohortNorm):
            old_res, new_res = self.calibration.apply(old_res, new_res, qo, qn)
            maps: list[ScoreMap | None] = [None, None]
        else:
            maps = [self.calibration.old, self.calibration.new]
        out = merge_results([old_res, new_res], k, maps=maps)
        self.cost.add_ms("merge", time.perf_counter() - t)
        out = out.head(kk)
        return SearchResult(out.scores, out.ids, {sp: v.generation for sp, v in views.items()})

    def _search_part(self, q: np.ndarray, k: int, view: Any) -> SearchResult:
        if view is None or not view.count:
            return SearchResult.empty(len(q), k, object_ids=True)
        if q.shape[1] != view.dim:
            raise InputError(f"queries have dimension {q.shape[1]}, space {view.space!r} "
                             f"holds {view.dim}")
        self.cost.index_searches += len(q)
        return view.search_ids(q, clamp_k(k, view.count)).pad(k)

    # ------------------------------------------------------------- contract
    def _search(self, q: Queries, k: int, options: SearchOptions) -> SearchResult:
        return self.search_vectors(new_queries=q.data.get(self.state.new_space),
                                   old_queries=q.data.get(self.state.old_space), k=k)

    def embed_paths(
        self, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 16, workers: int = 2
    ) -> tuple[Queries, list[int], list[QueryFailure]]:
        """Embed query images with the models the rule needs -> ``Queries`` keyed by space."""
        for space in self.spaces:
            if space not in self.models:
                role = "old" if space == self.state.old_space else "new"
                raise UpgradeError(f"rule {self.rule!r} needs the {role} model")
        t = time.perf_counter()
        q, good, fails = super().embed_paths(paths, batch_size=batch_size, workers=workers)
        self.cost.add_ms("embed", time.perf_counter() - t)
        for space in self.spaces:
            role = "old" if space == self.state.old_space else "new"
            self.cost.forward_passes[role] = self.cost.forward_passes.get(role, 0) + len(good)
        return q, good, fails


def fuse_queries(
    old_queries: np.ndarray, psi_queries: np.ndarray, *, weight: float = FUSE_WEIGHT
) -> np.ndarray:
    """``(Q, D_old)`` L2-normalised ``old(q) + weight * psi(new(q))`` (the fused rule)."""
    if old_queries.shape != psi_queries.shape:
        raise InputError(
            f"old queries {old_queries.shape} and psi queries {psi_queries.shape} differ"
        )
    return l2_normalize(old_queries + weight * psi_queries)


def job_calibration(
    gallery: Gallery, kind: str, *, psi: CrossModelMap | None = None
) -> Calibration | CohortNorm:
    """The normalisation of the two parts, built from the job's (old, new) pairs.

    ``znorm-top`` / ``znorm``: a :class:`CohortNorm` with the pairs as cohort.
    ``quantile`` / ``affine``: global maps of the old channel (queries
    ``psi(new(x))`` with ``psi``, else ``old(x)``) fitted on the pairs. With fewer
    than :data:`MIN_PAIRS` pairs: the psi artifact's stored quantile map when
    there is one, else identity (logged).
    """
    if kind not in NORMALIZATIONS:
        raise InputError(f"unknown calibration {kind!r}; known: {', '.join(NORMALIZATIONS)}")
    if kind == "identity":
        return Calibration.identity()
    ids, old, new = load_pairs(gallery.path)
    if len(ids) >= MIN_PAIRS:
        if kind.startswith("znorm"):
            return CohortNorm(old, new, top=COHORT_TOP if kind == "znorm-top" else None)
        q_old = psi.transform(new) if psi is not None else old
        cal = fit_calibration(kind, old_queries=q_old, old_gallery=old, new_embeddings=new)
        return Calibration(cal.old, cal.new, {**cal.info, "source": "job pairs"})
    if psi is not None:
        stored = psi.calibration("quantile")
        if stored is not None:
            return Calibration(stored.old, stored.new, {**stored.info, "source": "psi artifact"})
    log.warning("only %d calibration pairs and no stored calibration: merging raw scores",
                len(ids))
    return Calibration(ScoreMap(), ScoreMap(), {"kind": "identity", "source": "fallback"})
