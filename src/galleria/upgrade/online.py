"""psi learned online: fitted on the backfill's own (old, new) pairs, checked on
pseudo-queries, published atomically, used by search only when it wins.

While :func:`~galleria.upgrade.job.run_upgrade` moves items it keeps their
(old, new) vector pairs (the calibration cohort in ``<job>/pairs``, the rest up
to :attr:`OnlineConfig.max_pairs` in ``<job>/online/pairs``). On a schedule
(first at :attr:`OnlineConfig.first_at` pairs, then each time the pairs have
grown by :attr:`OnlineConfig.growth`) the run

1. fits a ridge psi (:class:`~galleria.upgrade.ridge.RidgePsi`; closed form,
   label-free) on all pairs so far, and the forward map phi of rule ``ensemble``
   (old -> new, :mod:`galleria.upgrade.phi_online`; also on the pseudo-query pairs);
2. scores, on the gallery as it is now, every label-free rule with
   *pseudo-queries*: phone-like views of a seeded sample of the gallery's own
   images, whose one true answer is the item each was made from
   (:mod:`galleria.images.pseudo`; embedded once per job with both models and
   kept in ``<job>/online/pseudo``): the old model's own answers (``old-only``,
   from the old vectors the job keeps of the moved items), ``rank-merge``,
   ``both`` (moved items scored by both models), ``ensemble`` (cross-fitted) and,
   with the psi, ``psi`` and ``fused``;
3. publishes: the maps into ``<job>/online/psi-<pairs>/``, ``phi-<digest>/`` (atomic
   estimator saves), then the decision into the job record (one settings write):
   ``state.online = {"rule", "psi", "map", "phi", "phi_map", "pairs", "scores", ...}``.

Between fits the check runs again (same psi) each time
:attr:`OnlineConfig.recheck_every` of the gallery has moved and when the last
item moves, so the decision is always about the gallery as it is now; a first
check runs when the first run starts (before any item moves). Each check also
fits the match-probability calibration of every rule it searched
(:mod:`galleria.upgrade.probability`), published with its decision.

``auto`` search (:func:`galleria.upgrade.search.resolve_rule`) follows the
published decision (:func:`decide_with_old`): the best merge rule (``psi``,
``fused`` or ``both`` only when it beats rank-merge by a margin unlikely to be
noise: the one-sided 95 % bound of the mean paired difference of reciprocal
ranks is above zero), served only once it beats the old answers by the same
test; the old answers until then (and before the first check), at every
fraction up to ``finish``, 100 % included. When the check
finds the merged answers *worse* than the old ones, the decision records it
(``verdict``) and ``upgrade status`` says so: the new model may be worse than
the old one on this gallery.

Kill -9 safe: a fit that dies before step 3 published nothing (the next run
fits again at the same point; an orphan map folder is removed by the next
publish); the decision names a complete map folder or the previous one. The
schedule is derived from the published decision (its pair count), so a resumed
run continues it. Cost: one SVD of the pairs per fit (geometric schedule: all
fits together cost about twice the last one) plus one merged search of the
pseudo-queries per rule; measured in benchmarks/results/backfill-online.md.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import GalleriaError, InputError
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.images.pseudo import make_pseudo_queries
from galleria.io.atomic import load_array, read_json, write_json, write_npy
from galleria.store.gallery import Gallery
from galleria.types import SearchResult
from galleria.upgrade.guard import (  # noqa: F401  (re-exported: the guard's decision)
    BASELINE,
    GUARD_MODES,
    OLD_ONLY,
    Z_ONE_SIDED_95,
    decide,
    decide_with_old,
    reciprocal_ranks,
)
from galleria.upgrade.oldonly import MovedOldVectors
from galleria.upgrade.pairs import PairStore
from galleria.upgrade.phi import PhiRidge
from galleria.upgrade.phi_online import drop_old_phis, ensemble_check, fit_job_phi, phi_for_check
from galleria.upgrade.probability import probability_record
from galleria.upgrade.psi import load_cross_map
from galleria.upgrade.ridge import RidgePsi
from galleria.upgrade.search import BackfillSearcher, job_calibration
from galleria.upgrade.state import (
    UpgradeState,
    decision_psi_path,
    job_folder,
    nothing_left,
    require_upgrade,
    save_state,
)

log = logging.getLogger(__name__)

ONLINE_DIR = "online"
PSI_RULES = ("psi", "fused")
BOTH = "both"
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class OnlineConfig:
    """How the job learns psi while it runs (recorded in the job at start).

    Attributes:
        enabled: fit psi during ``run`` at all.
        first_at: pairs before the first fit.
        growth: refit when the pairs have grown by this factor since the last fit.
        max_pairs: pairs kept for training (beyond them no more are stored) and
            the most a fit uses.
        pseudo_queries: how many gallery items the check makes views of.
        seed: seeds the pseudo-query sample, its views and the fit's subsample.
        depth: result depth of the check (ranks beyond it count as not found).
        guard: how the old model's own answers (rule ``old-only``) take part in
            the check (:func:`decide_with_old`): ``until-better`` (default: old
            answers until a merge rule beats them), ``unless-worse``, ``off``.
        recheck_every: between fits, check again (same psi, the gallery as it is
            now) each time this fraction of the gallery has moved since the last check.
    """

    enabled: bool = True
    first_at: int = 128
    growth: float = 2.0
    max_pairs: int = 20000
    pseudo_queries: int = 500
    seed: int = 0
    depth: int = 100
    guard: str = "until-better"
    recheck_every: float = 0.05

    def __post_init__(self) -> None:
        if self.first_at < 16:
            raise InputError(f"online psi: first_at must be >= 16, got {self.first_at}")
        if self.growth <= 1.0:
            raise InputError(f"online psi: growth must be > 1, got {self.growth}")
        if self.max_pairs < self.first_at:
            raise InputError("online psi: max_pairs must be >= first_at")
        if self.pseudo_queries < 10:
            raise InputError("online psi: at least 10 pseudo-queries")
        if self.guard not in GUARD_MODES:
            raise InputError(f"online psi: guard must be one of {', '.join(GUARD_MODES)}")
        if not 0.0 < self.recheck_every <= 1.0:
            raise InputError("online psi: recheck_every must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> OnlineConfig:
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- #
# pure parts: the schedule and the decision
# --------------------------------------------------------------------------- #


def next_fit_at(config: OnlineConfig, last_fit_pairs: int | None) -> int:
    """The pair count at which the next fit is due."""
    if not last_fit_pairs:
        return config.first_at
    return min(max(config.first_at, int(np.ceil(last_fit_pairs * config.growth))),
               max(config.max_pairs, last_fit_pairs + 1))


# --------------------------------------------------------------------------- #
# pairs and pseudo-queries of the job
# --------------------------------------------------------------------------- #


def online_folder(gallery: Gallery | str | Path) -> Path:
    return job_folder(gallery) / ONLINE_DIR


def train_pairs(gallery: Gallery) -> PairStore:
    """The pairs kept for psi beyond the calibration cohort."""
    return PairStore(online_folder(gallery) / "pairs")


def all_pairs(gallery: Gallery) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Cohort pairs then training pairs, one per id: ``(ids, old (N, D_o), new (N, D_n))``."""
    ids, old, new = PairStore(job_folder(gallery) / "pairs").load()
    ids2, old2, new2 = train_pairs(gallery).load()
    if not ids2:
        return ids, old, new
    if not ids:
        return ids2, old2, new2
    seen = set(ids)
    keep = [n for n, i in enumerate(ids2) if i not in seen]
    return ids + [ids2[n] for n in keep], np.concatenate([old, old2[keep]]), \
        np.concatenate([new, new2[keep]])


def pair_count(gallery: Gallery) -> int:
    return PairStore(job_folder(gallery) / "pairs").count() + train_pairs(gallery).count()


@dataclass(frozen=True)
class PseudoSet:
    """The job's pseudo-queries, embedded with both query models."""

    ids: list[str]
    old: np.ndarray
    new: np.ndarray
    fingerprint: str


def job_pseudo_queries(gallery: Gallery, state: UpgradeState, config: OnlineConfig,
                       old_model: Extractor, new_model: Extractor) -> PseudoSet:
    """Make (once per job) and load the pseudo-queries, embedded with both query models.

    Kept in ``<job>/online/pseudo/`` (arrays first, the JSON header naming them
    last, atomic writes): a run killed while embedding them makes them again.
    """
    folder = online_folder(gallery) / "pseudo"
    head = folder / "pseudo.json"
    want = {"old": old_model.fingerprint, "new": new_model.fingerprint,
            "n": config.pseudo_queries, "seed": config.seed}
    if head.is_file():
        try:
            meta = read_json(head)
            if all(meta.get(k) == v for k, v in want.items()):
                return PseudoSet(list(meta["ids"]), load_array(folder / "old.npy"),
                                 load_array(folder / "new.npy"), str(meta["fingerprint"]))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("pseudo-queries of the job unreadable (%s): making them again", exc)
    t = time.perf_counter()
    pq = make_pseudo_queries(gallery, n=config.pseudo_queries, seed=config.seed)
    old = old_model.embed_images(pq.images)
    new = new_model.embed_images(pq.images)
    folder.mkdir(parents=True, exist_ok=True)
    write_npy(folder / "old.npy", old.astype(np.float32))
    write_npy(folder / "new.npy", new.astype(np.float32))
    # query-side new embeddings are a cohort only when the new model is its own query model
    cohort = "query_config" not in gallery.space_info(state.new_space).info
    write_json(head, {**want, "ids": pq.ids, "fingerprint": pq.fingerprint, "cohort": cohort,
                      "skipped": len(pq.skipped),
                      "seconds": round(time.perf_counter() - t, 2)})
    log.info("%d pseudo-queries embedded with both models in %.1f s", len(pq),
             time.perf_counter() - t)
    return PseudoSet(pq.ids, old, new, pq.fingerprint)


# --------------------------------------------------------------------------- #
# one fit: fit, check, publish
# --------------------------------------------------------------------------- #


def check_rules(gallery: Gallery, pseudo: PseudoSet, psi: Any, *, depth: int = 100,
                with_old: bool = True, answers: dict[str, Any] | None = None,
                phi: PhiRidge | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-pseudo-query reciprocal ranks of old-only and both (when the job kept the
    vectors of every moved item; old-only with ``with_old``), ensemble (also with
    ``phi``), rank-merge and the psi rules (with ``psi``) on the gallery now.

    Each rule is searched exactly as live search does it
    (:class:`~galleria.upgrade.search.BackfillSearcher` with the job's calibration);
    ensemble cross-fitted on ``seed``-ed folds of the pseudo-queries
    (:func:`~galleria.upgrade.phi_online.ensemble_check`: phi learns from them).
    ``answers``: filled with ``rule -> (result, searcher)`` (the match-probability fit).
    """
    out: dict[str, np.ndarray] = {}
    new_space = require_upgrade(gallery).new_space
    kept = MovedOldVectors(gallery.path).covers(gallery.views([new_space]).get(new_space))

    def score(rule: str, s: BackfillSearcher, res: SearchResult) -> None:
        out[rule] = reciprocal_ranks(res, pseudo.ids)
        if answers is not None:
            answers[rule] = (res, s)

    if with_old and kept:
        s = BackfillSearcher(gallery, rule=OLD_ONLY)
        score(OLD_ONLY, s, s.search_vectors(old_queries=pseudo.old, k=depth))
    if kept:
        s = BackfillSearcher(gallery, rule=BOTH, calibration=job_calibration(gallery,
                                                                             "znorm-top"))
        score(BOTH, s, s.search_vectors(new_queries=pseudo.new, old_queries=pseudo.old,
                                        k=depth))
    if kept and phi is not None:  # cross-fitted: phi learns from the pseudo pairs
        ens = ensemble_check(gallery, pseudo.ids, pseudo.old, pseudo.new, phi, depth=depth,
                             seed=seed, moved=lambda: all_pairs(gallery)[1:])
        if ens is not None:
            out[ENSEMBLE] = ens[0]
            if answers is not None:
                answers[ENSEMBLE] = ens[1:]
    for rule in (BASELINE, *PSI_RULES):
        the_map = psi if rule in PSI_RULES else None
        if rule in PSI_RULES and psi is None:
            continue
        cal = job_calibration(gallery, "znorm-top", psi=the_map)
        s = BackfillSearcher(gallery, rule=rule, psi=the_map, calibration=cal)
        score(rule, s, s.search_vectors(new_queries=pseudo.new, old_queries=pseudo.old,
                                        k=depth))
    return out


def maybe_fit(gallery: Gallery, config: OnlineConfig, *, old_model: Extractor | None,
              new_model: Extractor | None, force: bool = False) -> dict[str, Any] | None:
    """Fit, check and publish when the schedule says so (or ``force``); else ``None``.

    Returns the published decision. Without both query models (the run has only
    the new gallery model) the pseudo-queries cannot be embedded: the map is
    published with ``rule = rank-merge`` and ``checked = False``.
    """
    state = require_upgrade(gallery)
    if state.mode != "online" or not config.enabled:
        return None
    last = dict(state.online.get("decision") or {})
    n = pair_count(gallery)
    if not force and n < next_fit_at(config, last.get("pairs")):
        return None
    if n < 8:
        return None
    t0 = time.perf_counter()
    ids, old, new = all_pairs(gallery)
    psi = RidgePsi(max_pairs=config.max_pairs, seed=config.seed).fit(
        new, old, new_fingerprint=state.new_space, old_fingerprint=state.old_space)
    fit_s = time.perf_counter() - t0
    folder = online_folder(gallery) / f"psi-{len(ids):08d}"
    psi.save(folder)
    t1 = time.perf_counter()
    phi = fit_job_phi(gallery, state, online_folder(gallery), moved_old=old, moved_new=new,
                      max_pairs=config.max_pairs, seed=config.seed)
    phi_s = time.perf_counter() - t1
    return check_and_publish(gallery, psi, folder, config=config, old_model=old_model,
                             new_model=new_model, source="online",
                             extra={"fit_s": round(fit_s, 3), "alpha": psi.info_["alpha"],
                                    "phi_fit_s": round(phi_s, 3)},
                             spent_s=fit_s + phi_s, phi=phi)


def online_run_start(gallery: Gallery, config: OnlineConfig, extractor: Extractor,
                     models: list[Extractor | None], runtime: str, threads: int | None) -> None:
    """Before the first item moves: the job's pseudo-queries, embedded with both models
    (the check's queries and, from the first query on, the calibration cohort), and a
    first check when the job has none yet (it serves the old answers, as before any
    check, and calibrates their match probabilities from the start)."""
    state = require_upgrade(gallery)
    try:
        if not models:
            models.extend(query_models(gallery, state, runtime=runtime, threads=threads,
                                       new_model=extractor))
        if models[0] is not None and models[1] is not None:
            job_pseudo_queries(gallery, state, config, models[0], models[1])
            if not state.online.get("decision"):
                recheck(gallery, config, old_model=models[0], new_model=models[1])
    except (GalleriaError, OSError, ValueError) as exc:
        log.warning("no pseudo-queries for this job (the backfill goes on): %s", exc)


def online_run_step(gallery: Gallery, config: OnlineConfig, extractor: Extractor,
                    models: list[Extractor | None], runtime: str, threads: int | None) -> None:
    """Fit / check / publish psi when due (see :mod:`galleria.upgrade.online`).

    The query models (old and new) are built on the first fit that is due and
    kept for the run (``models``); a failure of the online fit is logged, never
    fatal to the backfill.
    """
    state = require_upgrade(gallery)
    last = state.online.get("decision") or {}
    fit_due = pair_count(gallery) >= next_fit_at(config, last.get("pairs"))
    if not fit_due and not recheck_due(gallery, state, config):
        return
    try:
        if not models:
            models.extend(query_models(gallery, state, runtime=runtime, threads=threads,
                                       new_model=extractor))
        if fit_due:
            maybe_fit(gallery, config, old_model=models[0], new_model=models[1])
        else:
            recheck(gallery, config, old_model=models[0], new_model=models[1])
    except (GalleriaError, OSError, ValueError) as exc:
        log.warning("online psi fit / check failed (the backfill goes on): %s", exc)


def recheck_due(gallery: Gallery, state: UpgradeState, config: OnlineConfig) -> bool:
    """Whether :attr:`OnlineConfig.recheck_every` of the gallery moved since the last
    check, or the last item moved (the decision at 100 % is about the gallery at 100 %:
    ``auto`` follows it until ``finish``)."""
    if state.mode != "online" or not config.enabled:
        return False
    last = state.online.get("decision") or {}
    moved = gallery.count(state.new_space)
    since = moved - int(last.get("moved", 0))
    if since > 0 and nothing_left(gallery, state):  # failed items stay in the old part
        return True
    return since >= config.recheck_every * max(len(gallery), 1)


def recheck(gallery: Gallery, config: OnlineConfig, *, old_model: Extractor | None,
            new_model: Extractor | None) -> dict[str, Any]:
    """Check again on the gallery as it is now, with the published psi (if any); publish."""
    state = require_upgrade(gallery)
    folder = decision_psi_path(gallery, state)
    psi = (load_cross_map(folder, old_fingerprint=state.old_space,
                          new_fingerprint=state.new_space) if folder is not None else None)
    def fit() -> tuple[PhiRidge, Path] | None:  # no phi yet: pseudo (+ moved) pairs make one
        if old_model is None or new_model is None:
            return None
        job_pseudo_queries(gallery, state, config, old_model, new_model)
        _, o, n = all_pairs(gallery)
        return fit_job_phi(gallery, state, online_folder(gallery), moved_old=o, moved_new=n,
                           max_pairs=config.max_pairs, seed=config.seed)

    phi, spent = phi_for_check(gallery, state, fit)
    return check_and_publish(gallery, psi, folder, config=config, old_model=old_model,
                             new_model=new_model, source="recheck", phi=phi, spent_s=spent)


def check_and_publish(gallery: Gallery, psi: Any, folder: Path | None, *,
                      config: OnlineConfig,
                      old_model: Extractor | None, new_model: Extractor | None,
                      source: str, extra: dict[str, Any] | None = None,
                      spent_s: float = 0.0, phi: tuple[PhiRidge, Path] | None = None
                      ) -> dict[str, Any]:
    """Check a saved psi (``folder``) and phi (``(map, folder)``, rule ensemble) on the
    pseudo-queries and publish the decision.

    Without both query models the pseudo-queries cannot be embedded: the map is
    published with ``rule = rank-merge`` and ``checked = False``.
    """
    state = require_upgrade(gallery)
    last = dict(state.online.get("decision") or {})
    t1 = time.perf_counter()
    rule, scores, checked, verdict = BASELINE, {}, False, {}
    prob: dict[str, Any] | None = None
    if old_model is not None and new_model is not None:
        try:
            pseudo = job_pseudo_queries(gallery, state, config, old_model, new_model)
            t1 = time.perf_counter()  # the embedding of the pseudo-queries is a one-off
            answers: dict[str, Any] = {}
            rule, scores, verdict = decide_with_old(
                check_rules(gallery, pseudo, psi, depth=config.depth,
                            with_old=config.guard != "off", answers=answers,
                            phi=phi[0] if phi is not None else None, seed=config.seed),
                mode=config.guard)
            checked = True
        except (GalleriaError, OSError) as exc:
            log.warning("online psi: the pseudo-query check failed (%s); search keeps %s",
                        exc, BASELINE)
        if checked:  # an add-on: its failure never undoes the rule the check chose
            try:
                prob = probability_record(gallery, state, pseudo, answers, rule)
            except Exception as exc:  # any failure of the fit: no probabilities
                log.warning("online psi: fitting match probabilities failed (%s: %s); the "
                            "decision keeps %s without them", type(exc).__name__, exc, rule)
                prob = None
    check_s = time.perf_counter() - t1
    fit = source != "recheck"  # a recheck keeps the fit schedule (pairs of the last fit)
    decision = {
        **({} if fit else {k: v for k, v in last.items() if k in ("fit_s", "alpha")}),
        "rule": rule, "checked": checked, "source": source,
        "pairs": pair_count(gallery) if fit else int(last.get("pairs", 0)),
        "moved": gallery.count(state.new_space), "verdict": verdict,
        "map_pairs": int(psi.info_.get("n_pairs", 0)) if psi is not None else 0,
        "psi": _relative(gallery, folder) if folder is not None else None,
        "map": psi.fingerprint if psi is not None else None, "scores": scores,
        "check_s": round(check_s, 3), "at": time.time(),
        "total_s": round(float(last.get("total_s", 0.0)) + spent_s + check_s, 3),
        "fits": int(last.get("fits", 0)) + int(fit), "checks": int(last.get("checks", 0)) + 1,
        "probability": prob,
        "phi": _relative(gallery, phi[1]) if phi is not None else None,
        "phi_map": phi[0].fingerprint if phi is not None else None,
        "phi_pairs": int(phi[0].info_.get("n_pairs", 0)) if phi is not None else 0,
        **(extra or {}),
    }
    publish(gallery, decision)
    if verdict.get("merged_vs_old") == "worse":
        log.warning("the pseudo-query check finds the merged gallery worse than the old "
                    "model's answers (%s): search keeps the old answers; the new model may be "
                    "worse than the old one on this gallery", verdict)
    log.info("check (%s, psi of %d pairs) in %.2f s: search uses %s %s", source,
             decision["map_pairs"],
             check_s, rule, {r: v["mrr"] for r, v in scores.items()} if scores else "")
    return decision


def query_models(gallery: Gallery, state: UpgradeState, *, runtime: str = "auto",
                 threads: int | None = None, new_model: Extractor | None = None
                 ) -> tuple[Extractor | None, Extractor | None]:
    """The old and new *query* models of the job, rebuilt from the spaces' records.

    ``new_model``: the new gallery model already loaded (reused when the new space
    has no separate query model). A model that cannot be rebuilt is ``None`` (logged).
    """
    out: list[Extractor | None] = []
    for space in (state.old_space, state.new_space):
        info = gallery.space_info(space).info
        if space == state.new_space and new_model is not None and "query_config" not in info:
            out.append(new_model)
            continue
        try:
            out.append(extractor_from_space(info, root=gallery.path, runtime=runtime,
                                            threads=threads, query=True))
        except (GalleriaError, OSError, ImportError) as exc:
            log.warning("no %s query model (%s): psi cannot be checked on pseudo-queries",
                        "old" if space == state.old_space else "new", exc)
            out.append(None)
    return out[0], out[1]


def publish(gallery: Gallery, decision: dict[str, Any]) -> UpgradeState:
    """Record ``decision`` in the job (one settings write) and drop older map folders."""
    state = require_upgrade(gallery)
    online = {**state.online, "decision": decision}
    new = UpgradeState.from_dict({**state.to_dict(), "online": online})
    save_state(gallery, new)
    keep = (Path(gallery.path) / decision["psi"]).resolve() if decision.get("psi") else None
    prev = state.online.get("decision", {}).get("psi")
    keep_prev = (Path(gallery.path) / prev).resolve() if prev else None
    for p in online_folder(gallery).resolve().glob("psi-*"):
        if p != keep and p != keep_prev:  # the previous one: a searcher may be loading it
            shutil.rmtree(p, ignore_errors=True)
    prev_phi = state.online.get("decision", {}).get("phi")
    drop_old_phis(online_folder(gallery), [
        Path(gallery.path) / r if r else None for r in (decision.get("phi"), prev_phi)])
    return new


def _relative(gallery: Gallery, p: Path) -> str:
    try:
        return p.resolve().relative_to(Path(gallery.path).resolve()).as_posix()
    except ValueError:
        return str(p)
