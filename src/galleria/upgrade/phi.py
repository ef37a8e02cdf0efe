"""The forward map ``phi: old space -> new space`` of rule ``ensemble``, learned online.

Rule ``both`` (:mod:`galleria.upgrade.oldonly`) scores a moved item by the mean of
its Z-normed old and new scores, an item not moved yet by its old score alone.
Rule ``ensemble`` gives the items not moved yet a new-model side too, predicted
from their old vector: ``ghat = normalize(phi(old(x)))``. ``phi`` is the ridge
regression of :mod:`galleria.upgrade.ridge` with the roles swapped (old in, new
out, with an intercept, the output L2-normalised), fitted on the job's (old, new)
pairs of moved items *and* its pseudo-query pairs (views of the gallery's own
images embedded with both models before the first item moves), so it exists from
the first check on, before any item has moved.

:class:`PhiRidge` is a :class:`~galleria.upgrade.crossmap.CrossModelMap` of its own
kind ``phi-ridge``: its header records the old model as the one it *takes*
(``fingerprint``) and the new model as its output space. :meth:`PhiRidge.load`
refuses any other kind (a psi ``new -> old`` folder given as phi is refused, and
:func:`galleria.upgrade.psi.load_cross_map` refuses a phi folder given as psi),
:meth:`PhiRidge.transform` refuses vectors of another model, and loading checks
both fingerprints.

Pure helpers: :func:`fit_phi` (the fit on moved + pseudo pairs) and
:func:`pseudo_folds` (the seeded 2-fold split of the pseudo-queries the check
cross-fits phi with).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.upgrade.crossmap import mlp_forward
from galleria.upgrade.ridge import RidgePsi
from galleria.upgrade.state import (
    UpgradeError,
    UpgradeState,
    decision_phi_path,
    require_upgrade,
)

if TYPE_CHECKING:
    from galleria.store.gallery import Gallery

log = logging.getLogger(__name__)

FOLDS = 2
"""Folds of the pseudo-queries when the check cross-fits phi."""


class PhiRidge(RidgePsi):
    """``phi``: ridge regression old -> new with an intercept, output L2-normalised.

    ``phi(x) = normalize((normalize(x) - mu_old) W + mu_new)`` (one linear layer,
    weights ``(D_new, D_old)``). Fitted and saved like :class:`RidgePsi`; the
    fingerprints keep their meaning (``old_fingerprint_`` is the old model, the
    map's input; ``new_fingerprint_`` the new model, its output).

    Args:
        alphas, max_pairs, seed: as :class:`RidgePsi`.
    """

    kind: ClassVar[str] = "phi-ridge"
    INPUT: ClassVar[str] = "old"
    FIX_HINT: ClassVar[str] = ""

    def fit(  # type: ignore[override]
        self,
        old: object,
        new: object,
        *,
        labels: Any = None,
        old_fingerprint: str | None = None,
        new_fingerprint: str | None = None,
        progress: Any = None,
    ) -> PhiRidge:
        """Fit on ``(N, D_old)`` / ``(N, D_new)`` pairs of the same images (no labels).

        Note the order: the map's input (old) first. Keywords ``old=`` / ``new=``
        mean the same for every map (the model that made the vectors).
        """
        if labels is not None:
            raise InputError("the ridge phi is label-free: it takes no labels")
        if self.max_pairs < 8:
            raise InputError(f"max_pairs must be >= 8, got {self.max_pairs}")
        n, o = self._prepare_fit(new, old, new_fingerprint, old_fingerprint)
        total = o.shape[0]
        o, n, alpha, scores = self._fit_linear(o, n)
        fitted = self.transform(o)
        self.info_ = {"n_pairs": int(total), "fitted_on": int(o.shape[0]),
                      "alpha": alpha, "gcv": scores, "direction": "old -> new",
                      "train_cosine_to_new": float(np.mean(np.sum(fitted * n, axis=1)))}
        log.info("ridge phi on %d pairs: alpha %.3g, train cos(phi(old), new) = %.4f",
                 o.shape[0], alpha, self.info_["train_cosine_to_new"])
        return self

    def raw(self, old: np.ndarray) -> np.ndarray:
        """``(N, D_new)`` ``phi`` before the output normalisation (rows of unit ``old``)."""
        self._check_fitted()
        return mlp_forward(np.asarray(old, np.float32), self.weights_)

    @property
    def linear(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W (D_new, D_old), b (D_new,))``: ``raw(x) = x W^T + b``."""
        self._check_fitted()
        return self.weights_[0]


def load_phi(path: str | os.PathLike[str], *, old_fingerprint: str | None = None,
             new_fingerprint: str | None = None) -> PhiRidge:
    """Read a phi saved by :meth:`PhiRidge.save`; refuses another kind of map and
    other models (:class:`~galleria.errors.CompatibilityError`)."""
    return PhiRidge.load(Path(path), old_fingerprint=old_fingerprint,
                         new_fingerprint=new_fingerprint)


def published_phi(gallery: Gallery, state: UpgradeState,
                  path: str | os.PathLike[str] | None = None) -> PhiRidge:
    """The forward map phi of rule ``ensemble``: ``path``, else the one the job's decision
    published (refused unless it is the map the decision records: a stale folder).

    The job keeps the previous map folder when it publishes a new one; a reader that
    still lost the race (two publications while it loaded) reads the decision again.
    """
    if path is not None:
        return load_phi(path, old_fingerprint=state.old_space, new_fingerprint=state.new_space)
    err: Exception | None = None
    for attempt in range(3):
        st = state if attempt == 0 else require_upgrade(gallery)
        p = decision_phi_path(gallery, st)
        if p is None:
            err = UpgradeError("rule ensemble needs the forward map phi the job fits while it "
                               "runs (`galleria upgrade run`; not fitted yet)")
            continue
        try:
            phi = load_phi(p, old_fingerprint=st.old_space, new_fingerprint=st.new_space)
        except (FormatError, OSError) as exc:  # removed while it was read
            err = exc
            continue
        want = (st.online.get("decision") or {}).get("phi_map")
        if want is None or phi.fingerprint == want:
            return phi
        err = UpgradeError(f"the phi in {p} is not the one the job's decision records "
                           "(republished meanwhile): open the searcher again")
    assert err is not None
    raise err


def fit_phi(moved_old: np.ndarray, moved_new: np.ndarray,
            pseudo_old: np.ndarray | None, pseudo_new: np.ndarray | None, *,
            old_fingerprint: str, new_fingerprint: str, max_pairs: int = 20000,
            seed: int = 0) -> PhiRidge | None:
    """phi on the moved pairs plus the pseudo-query pairs (either may be empty).

    Args:
        moved_old, moved_new: ``(N, D_old)`` / ``(N, D_new)`` pairs of moved items.
        pseudo_old, pseudo_new: ``(P, D_old)`` / ``(P, D_new)`` pseudo-query pairs
            (``None``: none).

    Returns:
        The fitted map, or ``None`` with fewer than 8 pairs in all.
    """
    olds = [a for a in (moved_old, pseudo_old) if a is not None and len(a)]
    news = [a for a in (moved_new, pseudo_new) if a is not None and len(a)]
    if sum(len(a) for a in olds) < 8:
        return None
    return PhiRidge(max_pairs=max_pairs, seed=seed).fit(
        np.concatenate(olds), np.concatenate(news), old_fingerprint=old_fingerprint,
        new_fingerprint=new_fingerprint)


def pseudo_folds(n: int, *, seed: int = 0, folds: int = FOLDS) -> np.ndarray:
    """``(n,)`` fold of each pseudo-query: a seeded permutation cut into ``folds``
    consecutive parts of (nearly) equal size."""
    if n < folds:
        raise InputError(f"{n} pseudo-queries cannot be split into {folds} folds")
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    for f, part in enumerate(np.split(perm, (np.arange(1, folds) * n) // folds)):
        out[part] = f  # 2 folds: perm[: n // 2] and perm[n // 2:]
    return out
