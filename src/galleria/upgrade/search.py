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
``old-only``           ``old(q)`` on every item: shadow mode, or online with the
                       old vectors the job kept of the moved items (the old answers)
``both``               ``old(q)`` on every item (kept old     adaptive Z-norm (cohort);
                       vectors of the moved ones); moved      moved items: mean of the
                       items also ``new(q)``                  two Z-scores
``ensemble``           as ``both``; items not moved yet       adaptive Z-norm (cohort);
                       also ``new(q)`` against               every item: mean of the
                       ``normalize(phi(old(x)))``             two Z-scores
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
raw scores. Measured in benchmarks/results/backfill.md. ``ensemble``: see
:mod:`galleria.upgrade.ensemble`. :class:`QueryCost` records forward passes,
index searches and milliseconds per stage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.extract.queries import Queries, QueryFailure
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.search.contract import Searcher, SearchOptions
from galleria.store.gallery import Gallery
from galleria.types import SearchResult, clamp_k
from galleria.upgrade.ensemble import (
    EnsembleScorer,
    candidate_depth,
    read_old_vectors,
    search_unmoved,
)
from galleria.upgrade.jobcal import (  # re-exported: callers import them from here
    fuse_queries,
    job_calibration,
)
from galleria.upgrade.local_search import LocalChangeSearcher
from galleria.upgrade.merge import (
    Calibration,
    CohortNorm,
    ScoreMap,
    cohort_stats,
    merge_results,
)
from galleria.upgrade.oldonly import MovedOldVectors
from galleria.upgrade.pairs import PairStore
from galleria.upgrade.parts import QueryCost, search_excluding
from galleria.upgrade.phi import PhiRidge, published_phi
from galleria.upgrade.probability import lookup, normalization_name
from galleria.upgrade.psi import CrossModelMap, load_cross_map
from galleria.upgrade.rescore import RESCORE_DEPTH, TransformRescorer
from galleria.upgrade.state import (
    UpgradeError,
    UpgradeState,
    active_upgrade,
    decision_phi_path,
    decision_psi_path,
    job_folder,
    require_upgrade,
    transform_path,
)
from galleria.validate import as_embeddings

log = logging.getLogger(__name__)

RULES = ("auto", "naive", "rank-merge", "psi", "fused", "metric-compatible", "old-only",
         "both", "ensemble", "rescore")
TRANSFORM_OF_RULE = {"psi": "regression", "fused": "regression",
                     "metric-compatible": "metric-compatible"}
OLD_MODEL_RULES = ("naive", "rank-merge", "fused", "old-only", "both", "ensemble", "rescore")
KEPT_OLD_RULES = ("old-only", "both", "ensemble")
"""Rules that read the old vectors the job kept of the moved items (online mode)."""


def resolve_rule(rule: str, gallery: Gallery, state: UpgradeState) -> str:
    """``auto``: old-only in shadow mode; else the rule the job's last pseudo-query
    check chose (:mod:`galleria.upgrade.online`: ``old-only`` -- the old model's
    answers, until a merge rule beats them on the gallery's own pseudo-queries --,
    or ``psi`` / ``fused`` with the psi it checked, only when they beat
    rank-merge; ``both`` / ``ensemble``, the latter with the phi it published);
    else rank-merge. The decision holds at every fraction up to ``finish``, 100 %
    included (every item moved: the check compares the new model, alone or with the
    kept old vectors, against the old answers). (metric-compatible is never chosen
    automatically: its gains come from the labels it was trained with and did
    not transfer across domains in the benchmark; ask for it by name.)"""
    if rule not in RULES:
        raise InputError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    if rule != "auto":
        return rule
    if state.mode == "shadow":
        return "old-only"
    if state.change == "transform":  # the old part can be scored in the new space
        return "rescore"
    d = state.online.get("decision") or {}
    if d.get("checked") and d.get("rule") in ("psi", "fused") \
            and decision_psi_path(gallery, state) is not None:
        return str(d["rule"])
    # the old answers while the job is unfinished and kept the old vectors of every
    # moved item, at 100 % too (the run checks again when the last item moves): the
    # new model's answers take over at `finish`, never before a check says they win
    kept = state.change == "model" and kept_pairs_cover(gallery, state)
    if kept and d.get("checked") and d.get("rule") in KEPT_OLD_RULES:
        if d["rule"] == "ensemble" and decision_phi_path(gallery, state) is None:
            return "old-only"  # its phi is gone: the old answers, never an unchecked rule
        return str(d["rule"])  # old-only: no merge rule beat the old answers
    cfg = state.online.get("config") or {}
    if kept and not d and cfg.get("enabled", True) and cfg.get("guard", "off") != "off":
        return "old-only"  # the old answers until the first check says otherwise
    return "rank-merge"


def kept_pairs_cover(gallery: Gallery, state: UpgradeState) -> bool:
    """Whether the job kept (old, new) pairs for as many items as it moved (rules
    ``old-only`` / ``both`` of an online job need them; :mod:`.oldonly`)."""
    folder = job_folder(gallery)
    kept = PairStore(folder / "pairs").count() + PairStore(folder / "online" / "pairs").count()
    return kept >= gallery.count(state.new_space)


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
        rescorer: TransformRescorer | None = None,
        phi: PhiRidge | None = None,
    ) -> None:
        self.gallery = gallery
        self.state = require_upgrade(gallery)
        self.rule = resolve_rule(rule, gallery, self.state)
        if self.rule == "rescore" and self.state.change != "transform":
            raise UpgradeError("rule rescore scores the old part in the new space: only a "
                               "transform change can (its new vectors are T(stored vectors))")
        if self.rule == "rescore" and rescorer is None:
            rescorer = TransformRescorer(gallery, self.state)
        self.rescorer = rescorer
        if self.state.mode == "shadow" and self.rule != "old-only":
            raise UpgradeError(
                "in shadow mode the backfilled items keep their old vectors: search with "
                "rule old-only until `galleria upgrade finish`"
            )
        self.moved_old: MovedOldVectors | None = None
        if self.rule in ("both", "ensemble") and self.state.mode != "online":
            raise UpgradeError(f"rule {self.rule} needs an online upgrade")
        if self.state.mode == "online" and self.rule in KEPT_OLD_RULES:
            if self.state.change != "model":
                raise UpgradeError(f"rule {self.rule} applies to model upgrades")
            # the moved items' old vectors are kept in the job's pairs
            self.moved_old = MovedOldVectors(gallery.path)
        if self.rule in TRANSFORM_OF_RULE:
            if psi is None or isinstance(psi, PhiRidge):
                raise UpgradeError(f"rule {self.rule!r} needs a trained psi map (new -> old)")
            psi.check_models(old=self.state.old_space, new=self.state.new_space)
        self.psi = psi
        self.phi = phi if self.rule == "ensemble" else None
        if self.rule == "ensemble":
            if not isinstance(phi, PhiRidge):
                raise UpgradeError("rule ensemble needs the job's forward map phi (old -> new)")
            phi.check_models(old=self.state.old_space, new=self.state.new_space)
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
        self.ensemble = EnsembleScorer(phi, self.calibration) if self.phi is not None else None
        self.cost = QueryCost()

    @property
    def spaces(self) -> list[str]:  # type: ignore[override]
        """The query spaces the rule needs: old and/or new (not the new one when the
        rule ``rescore`` derives it from the old one: ``T(old(q))``)."""
        need_old, need_new = self.needs()
        if self.rescorer is not None and self.rescorer.derives_queries:
            need_new = False
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
        extra = {} if self.phi is None else {
            "phi": self.phi.fingerprint, "candidate_depth": f"max({candidate_depth(1)}, 4 k)"}
        return {**super().describe(), "model": self.state.new_space, "pipeline": "global",
                "merge": {"rule": self.rule, "old_space": self.state.old_space,
                          "new_space": self.state.new_space, "calibration": info, **extra}}

    @property
    def map_fingerprint(self) -> str | None:
        """The learned map the rule uses (psi, or phi of rule ensemble), or ``None``."""
        m = self.psi if self.psi is not None else self.phi
        return m.fingerprint if m is not None else None

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
        phi: str | os.PathLike[str] | None = None,
    ) -> BackfillSearcher | LocalChangeSearcher:
        """Open a gallery under upgrade for search (a :class:`LocalChangeSearcher` while
        local features are added; ``with_models=False``: query vectors only).

        Args:
            rule: merge rule (:data:`RULES`).
            psi: a trained map folder (default: the job's map for the rule).
            calibration: one of :data:`NORMALIZATIONS` (default ``znorm-top``
                for rank-merge and psi, ``identity`` for the others).
            phi: a forward map folder for rule ``ensemble`` (default: the one the
                job published, refused when it is not the map its decision records).
        """
        gallery = path if isinstance(path, Gallery) else Gallery.open(path)
        state = require_upgrade(gallery)
        if state.change == "local":  # local features being added: global + local parts
            return LocalChangeSearcher.open(gallery, runtime=runtime, threads=threads,
                                            with_models=with_models, rule=rule)
        asked = rule
        rule = resolve_rule(rule, gallery, state)
        the_phi = None
        if rule == "ensemble":
            try:
                the_phi = published_phi(gallery, state, phi)
                checked = (state.online.get("decision") or {}).get("phi_map")
                if asked == "auto" and phi is None and the_phi.fingerprint != checked:
                    raise UpgradeError("the job republished phi while it was loaded; the one "
                                       "read now is not the one the check chose ensemble with")
            except (UpgradeError, FormatError, OSError) as exc:  # auto: the old answers
                if asked != "auto":
                    raise
                log.warning("rule ensemble without its phi (%s): serving old-only", exc)
                rule = "old-only"
        needs_old = rule in OLD_MODEL_RULES and with_models
        needs_new = rule != "old-only" and with_models
        rescorer = TransformRescorer(gallery, state) if rule == "rescore" else None
        if rescorer is not None and rescorer.derives_queries:
            needs_new = False  # T(old(q)): one forward pass
        old_ext = (extractor_from_space(gallery.space_info(state.old_space).info,
                                        root=gallery.path, runtime=runtime, threads=threads,
                                        query=True) if needs_old else None)
        new_ext = (extractor_from_space(gallery.space_info(state.new_space).info,
                                        root=gallery.path, runtime=runtime, threads=threads,
                                        query=True) if needs_new else None)
        the_map = None
        if rule in TRANSFORM_OF_RULE:
            p = Path(psi) if psi is not None else None
            if p is None and asked == "auto":  # the map the check chose the rule with
                p = decision_psi_path(gallery, state)
            if p is None:
                p = transform_path(gallery, state, TRANSFORM_OF_RULE[rule])
            if p is None and rule in ("psi", "fused"):  # the online psi of the job
                p = decision_psi_path(gallery, state)
            if p is None:
                raise UpgradeError(
                    f"rule {rule!r} needs a trained map: run `galleria upgrade train-transform "
                    f"INDEX --kind {TRANSFORM_OF_RULE[rule]} ...` or pass --psi DIR"
                )
            the_map = load_cross_map(p, old_fingerprint=state.old_space,
                                     new_fingerprint=state.new_space)
        kind = calibration or ("znorm-top" if rule in ("rank-merge", "psi", "fused", "both",
                                                       "ensemble") else "identity")
        cal = job_calibration(gallery, kind, psi=the_map if rule in TRANSFORM_OF_RULE else None)
        return cls(gallery, rule=rule, old_extractor=old_ext, new_extractor=new_ext,
                   psi=the_map, calibration=cal, rescorer=rescorer, phi=the_phi)

    def match_calibration(self) -> dict[str, Any] | None:
        """The calibration (:mod:`galleria.calibration`) of this searcher's scores,
        fitted by the job's last pseudo-query check (:mod:`.probability`); ``None`` when
        that check did not calibrate this rule, psi map and normalisation, or the
        gallery moved on since (the reason is logged at debug level)."""
        state = active_upgrade(self.gallery)
        if state is None:
            return None
        record = (state.online.get("decision") or {}).get("probability")
        cal, why = lookup(record, rule=self.rule, old_space=state.old_space,
                          new_space=state.new_space, job_started=state.started,
                          map_fingerprint=self.map_fingerprint,
                          normalization=normalization_name(self.calibration),
                          moved=self.gallery.count(state.new_space), items=len(self.gallery))
        if cal is None:
            log.debug("no match probabilities for rule %s: %s", self.rule, why)
        return cal

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
        if need_new and new_queries is None and self.rescorer is not None \
                and self.rescorer.derives_queries and old_queries is not None:
            new_queries = self.rescorer.query(as_embeddings(old_queries, name="old_queries"))
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
        # k is clamped to the items searched, as every searcher does
        kk = clamp_k(k, sum(v.count for v in views.values()))
        if self.rule == "ensemble":
            if len(qn) != nq:
                raise InputError(f"{nq} old-side queries but {len(qn)} new-side queries")
            assert self.phi is not None  # made for these models: its dims are the spaces'
            for q, dim, space in ((qo, self.phi.old_dim_, old_space),
                                  (qn, self.phi.new_dim_, new_space)):
                if q.shape[1] != dim:
                    raise InputError(f"queries have dimension {q.shape[1]}, space {space!r} "
                                     f"holds {dim}")
            return self._search_ensemble(qo, qn, k, kk, views, t)
        if self.rule == "rescore":
            assert self.rescorer is not None
            return self._search_rescored(qo, qn, k, views, t).head(kk)
        old_res = (self._search_part(qo, k, views.get(old_space))
                   if self.state.change == "model" else
                   search_excluding(qo, k, views.get(old_space), views.get(new_space)))
        if self.state.change != "model":
            self.cost.index_searches += len(qo)
        if self.rule == "old-only":
            ov = views.get(old_space)
            if self.moved_old is not None:  # online: the moved items by their kept old vectors
                moved = self.moved_old.search(qo, k, views.get(new_space))
                if moved is None:
                    raise UpgradeError(
                        "rule old-only: the job did not keep the old vectors of every moved "
                        "item (more items moved than OnlineConfig.max_pairs); use rank-merge")
                both = merge_results([old_res, moved], k).head(kk)  # one space: raw scores
                self.cost.add_ms("search", time.perf_counter() - t)
                return SearchResult(both.scores, both.ids,
                                    {sp: v.generation for sp, v in views.items()})
            self.cost.add_ms("search", time.perf_counter() - t)
            old_res = old_res.head(clamp_k(k, ov.count if ov is not None else 0))
            return SearchResult(old_res.scores, old_res.ids,
                                {sp: v.generation for sp, v in views.items()})
        if len(qn) != nq:
            raise InputError(f"{nq} old-side queries but {len(qn)} new-side queries")
        if self.rule == "both":
            return self._search_both(qo, qn, k, kk, old_res, views, t)
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

    def _search_both(self, qo: np.ndarray, qn: np.ndarray, k: int, kk: int,
                     old_res: SearchResult, views: dict[str, Any], t: float) -> SearchResult:
        """Rule ``both``: items not moved by their Z-normed old score, moved items by the
        mean of their Z-normed old (kept) and new scores (:mod:`.oldonly`)."""
        assert self.moved_old is not None
        cal = self.calibration
        if isinstance(cal, CohortNorm):
            mo, so = cohort_stats(qo, cal.old_cohort, top=cal.top)
            mn, sn = cohort_stats(qn, cal.new_cohort, top=cal.top)
        else:  # too few pairs for a cohort: raw scores
            one = np.ones((len(qo), 1), np.float32)
            mo, so, mn, sn = 0 * one, one, 0 * one, one
        moved = self.moved_old.search_both(qo, qn, k, views.get(self.state.new_space),
                                           (mo, so, mn, sn))
        if moved is None:
            raise UpgradeError("rule both: the job did not keep the vectors of every moved "
                               "item (more items moved than OnlineConfig.max_pairs)")
        self.cost.index_searches += len(qo)
        self.cost.add_ms("search", time.perf_counter() - t)
        t = time.perf_counter()
        z_old = SearchResult((old_res.scores - mo) / so, old_res.ids)
        out = merge_results([z_old, moved], k).head(kk)
        self.cost.add_ms("merge", time.perf_counter() - t)
        return SearchResult(out.scores, out.ids, {sp: v.generation for sp, v in views.items()})

    def _search_ensemble(self, qo: np.ndarray, qn: np.ndarray, k: int, kk: int,
                         views: dict[str, Any], t: float) -> SearchResult:
        """Rule ``ensemble`` (:mod:`.ensemble`): moved items as rule ``both``; items not
        moved yet by ``0.5 (z_old + z_new(phi(old)))``, exact on their candidates."""
        assert self.moved_old is not None and self.ensemble is not None
        st = self.ensemble.stats(qo, qn)
        moved = self.moved_old.search_both(qo, qn, k, views.get(self.state.new_space), st[:4])
        if moved is None:
            raise UpgradeError("rule ensemble: the job did not keep the vectors of every moved "
                               "item (more items moved than OnlineConfig.max_pairs)")
        t1 = time.perf_counter()
        rest, mapped = search_unmoved(self.ensemble, qo, qn, st, views.get(self.state.old_space),
                                      candidate_depth(k), partial(
                                          read_old_vectors, self.gallery,
                                          self.state.old_space, self.moved_old))
        self.cost.index_searches += 2 * len(qo)  # old part: surrogate and old(q)
        self.cost.map_calls += mapped
        self.cost.add_ms("phi+rescore", time.perf_counter() - t1)
        self.cost.add_ms("search", t1 - t)
        t = time.perf_counter()
        out = merge_results([rest, moved], k).head(kk)
        self.cost.add_ms("merge", time.perf_counter() - t)
        return SearchResult(out.scores, out.ids, {sp: v.generation for sp, v in views.items()})

    def _search_rescored(self, qo: np.ndarray, qn: np.ndarray, k: int, views: dict[str, Any],
                         t: float) -> SearchResult:
        """Rule ``rescore``: both parts scored in the new space (see :mod:`.rescore`)."""
        assert self.rescorer is not None
        old_space, new_space = self.state.old_space, self.state.new_space
        if len(qn) != len(qo):
            raise InputError(f"{len(qo)} old-side queries but {len(qn)} new-side queries")
        short = search_excluding(qo, max(RESCORE_DEPTH, 4 * k), views.get(old_space),
                                 views.get(new_space))
        new_res = self._search_part(qn, k, views.get(new_space))
        self.cost.index_searches += 2 * len(qo)
        self.cost.add_ms("search", time.perf_counter() - t)
        t = time.perf_counter()
        out = merge_results([self.rescorer.rescore(short, qn), new_res], k)
        self.cost.add_ms("merge", time.perf_counter() - t)
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
