"""phi learned online, and the check of rule ``ensemble`` cross-fitted on the pseudo-queries.

The job fits the forward map phi (:mod:`galleria.upgrade.phi`) with psi, on the
same schedule (:func:`galleria.upgrade.online.maybe_fit`), and once at the first
check when none is published yet (the pseudo-query pairs alone make one before
any item moves). Training pairs: every (old, new) pair the job kept of a moved
item plus the job's pseudo-query pairs (when those are gallery-side vectors of
both models: the new model is its own query model).

phi is trained on the pseudo-query pairs, so the check could not score rule
``ensemble`` on those same pseudo-queries fairly. It is cross-fitted: the
pseudo-queries are split into :data:`~galleria.upgrade.phi.FOLDS` seeded folds;
each fold's queries are searched with a phi fitted on the moved pairs and the
*other* folds' pseudo pairs only; the reciprocal ranks are put back in the
original order. The served phi is the one fitted on everything. The fold maps
of a served phi are fitted once and kept for the rechecks of the same run
(:data:`_FOLD_MAPS`); a resumed run fits them again on the pairs of that moment.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from galleria.errors import GalleriaError
from galleria.images.pseudo import rank_of_truth
from galleria.store.gallery import Gallery
from galleria.types import SearchResult
from galleria.upgrade.pairs import load_pseudo_pairs
from galleria.upgrade.phi import PhiRidge, fit_phi, pseudo_folds, published_phi
from galleria.upgrade.search import BackfillSearcher, job_calibration
from galleria.upgrade.state import UpgradeState, decision_phi_path

log = logging.getLogger(__name__)

PHI_PREFIX = "phi-"
_FOLD_MAPS: dict[tuple[str, int, str], list[PhiRidge | None]] = {}
_FOLD_LOCK = threading.Lock()

PairsFn = Callable[[], tuple[np.ndarray, np.ndarray]]


def fit_job_phi(gallery: Gallery, state: UpgradeState, folder: Path, *,
                moved_old: np.ndarray, moved_new: np.ndarray, max_pairs: int, seed: int
                ) -> tuple[PhiRidge, Path] | None:
    """Fit phi on the moved pairs + the pseudo-query pairs and save it (atomically) as
    ``folder/phi-<digest>``; ``None`` with fewer than 8 pairs in all."""
    pseudo = load_pseudo_pairs(gallery.path)
    po, pn = pseudo if pseudo is not None else (None, None)
    try:  # an add-on of the fit: its failure never stops psi's publication
        phi = fit_phi(moved_old, moved_new, po, pn, old_fingerprint=state.old_space,
                      new_fingerprint=state.new_space, max_pairs=max_pairs, seed=seed)
        if phi is None:
            return None
        phi.info_["pseudo_pairs"] = 0 if po is None else len(po)
        out = folder / (PHI_PREFIX + hashlib.sha256(phi.fingerprint.encode()).hexdigest()[:8])
        phi.save(out)  # a folder left half-written is dropped by the next publication
    except (GalleriaError, OSError, ValueError) as exc:  # LinAlgError is a ValueError
        log.warning("online phi: fit failed (%s); rule ensemble is left out", exc)
        return None
    return phi, out


def phi_for_check(gallery: Gallery, state: UpgradeState,
                  fit: Callable[[], tuple[PhiRidge, Path] | None]
                  ) -> tuple[tuple[PhiRidge, Path] | None, float]:
    """``((phi, folder) or None, seconds spent fitting)`` for a check between fits: the
    published phi, else ``fit()`` (a failure is logged: the check goes on without it;
    a published phi that cannot be read is fitted again, never stopping the check)."""
    at = decision_phi_path(gallery, state)
    if at is not None:
        try:
            phi = published_phi(gallery, state)
            if phi.fingerprint == (state.online.get("decision") or {}).get("phi_map"):
                return (phi, at), 0.0  # the phi in ``at`` (a retry may read a newer one)
            log.warning("the published phi changed while it was read: fitting it again")
        except (GalleriaError, OSError) as exc:  # damaged on disk: an add-on, fit again
            log.warning("the published phi cannot be read (%s): fitting it again", exc)
    t = time.perf_counter()
    try:
        return fit(), time.perf_counter() - t
    except (GalleriaError, OSError) as exc:
        log.warning("no forward map phi for this check (rule ensemble left out): %s", exc)
        return None, time.perf_counter() - t


def fold_maps(phi: PhiRidge, n_pseudo: int, moved: PairsFn, pseudo_old: np.ndarray,
              pseudo_new: np.ndarray, *, seed: int) -> tuple[np.ndarray, list[PhiRidge | None]]:
    """``(fold of each pseudo-query, phi of each fold)``: fold ``f``'s map never saw
    fold ``f``'s pseudo pairs (fitted on the moved pairs + the other folds' pairs)."""
    folds = pseudo_folds(n_pseudo, seed=seed)
    # the maps hold for these folds of these pseudo pairs only (not for another seed/set)
    pairs = hashlib.sha256(np.ascontiguousarray(pseudo_old, np.float32).tobytes()
                           + np.ascontiguousarray(pseudo_new, np.float32).tobytes())
    key = (phi.fingerprint, int(seed), f"{n_pseudo}:{pairs.hexdigest()}")
    with _FOLD_LOCK:
        maps = _FOLD_MAPS.get(key)
    if maps is None:
        mo, mn = moved()
        maps = []
        for f in range(int(folds.max()) + 1):
            other = folds != f
            maps.append(fit_phi(mo, mn, pseudo_old[other], pseudo_new[other],
                                old_fingerprint=str(phi.old_fingerprint_),
                                new_fingerprint=str(phi.new_fingerprint_),
                                max_pairs=phi.max_pairs, seed=phi.seed))
        with _FOLD_LOCK:
            _FOLD_MAPS.clear()  # only the served phi's folds are worth keeping
            _FOLD_MAPS[key] = maps
    return folds, maps


def ensemble_check(gallery: Gallery, truth: Sequence[str], pseudo_old: np.ndarray,
                   pseudo_new: np.ndarray, phi: PhiRidge, *, depth: int, seed: int,
                   moved: PairsFn) -> tuple[np.ndarray, SearchResult, Any] | None:
    """Per-pseudo-query reciprocal ranks of rule ``ensemble``, cross-fitted.

    Args:
        truth: ``(P,)`` the source item of each pseudo-query.
        pseudo_old, pseudo_new: ``(P, D_old)`` / ``(P, D_new)`` their embeddings.
        phi: the served map (fitted on every pair).
        moved: returns the moved pairs ``(old, new)`` (read only when the fold maps
            of ``phi`` are not in memory).

    Returns:
        ``(rr (P,), the merged result in the original order, an object with the
        served searcher's ``calibration`` and ``map_fingerprint``)``; ``None`` when a
        fold's map cannot be fitted without that fold (fewer than 8 pairs left).
    """
    cal = job_calibration(gallery, "znorm-top")
    served = SimpleNamespace(calibration=cal, map_fingerprint=phi.fingerprint, psi=None)
    n = len(truth)
    saw = phi.info_.get("pseudo_pairs")  # how many pseudo pairs phi learned from (record)
    if (not saw if saw is not None else load_pseudo_pairs(gallery.path) is None):
        # phi never saw the pseudo pairs: the served map is scored as it is
        s = BackfillSearcher(gallery, rule="ensemble", phi=phi, calibration=cal)
        res = s.search_vectors(new_queries=pseudo_new, old_queries=pseudo_old, k=depth)
        return _rr(res, truth), res, served
    if n < 4:
        return None
    try:
        folds, maps = fold_maps(phi, n, moved, pseudo_old, pseudo_new, seed=seed)
    except (GalleriaError, OSError, ValueError) as exc:
        log.warning("ensemble check: the fold maps failed (%s); rule left out", exc)
        return None
    out: SearchResult | None = None
    for f, m in enumerate(maps):
        rows = np.flatnonzero(folds == f)
        if m is None:  # too few pairs without the fold: no fair check of the rule
            log.info("ensemble check: fold %d has too few pairs to fit phi without it", f)
            return None
        s = BackfillSearcher(gallery, rule="ensemble", phi=m, calibration=cal)
        res = s.search_vectors(new_queries=pseudo_new[rows], old_queries=pseudo_old[rows],
                               k=depth)
        if out is None:
            out = SearchResult.empty(n, res.ids.shape[1], object_ids=True)
            out = SearchResult(out.scores, out.ids, res.generation)
        out.scores[rows], out.ids[rows] = res.scores, res.ids
    assert out is not None
    return _rr(out, truth), out, served


def _rr(result: SearchResult, truth: Sequence[str]) -> np.ndarray:
    r = rank_of_truth(result, truth)
    return np.where(r >= 0, 1.0 / (1.0 + np.maximum(r, 0)), 0.0)


def drop_old_phis(folder: Path, keep: Sequence[Path | None]) -> None:
    """Remove ``phi-*`` folders other than ``keep`` (the published one and the previous
    one, which a searcher may be loading)."""
    want = {p.resolve() for p in keep if p is not None}
    for p in folder.resolve().glob(PHI_PREFIX + "*"):
        if p not in want:
            shutil.rmtree(p, ignore_errors=True)
