"""The merge scale of a backfill search built from the job's pairs, and the fused query.

Kept apart from :mod:`galleria.upgrade.search` (which re-exports these names):
:func:`job_calibration` (the normalisation of the two parts), :func:`fuse_queries`
(rule ``fused``'s old-part query) and their constants.
"""

from __future__ import annotations

import logging

import numpy as np

from galleria.errors import InputError
from galleria.store.gallery import Gallery
from galleria.upgrade.merge import Calibration, CohortNorm, ScoreMap, fit_calibration
from galleria.upgrade.pairs import cohort_pairs, load_pairs
from galleria.upgrade.psi import CrossModelMap
from galleria.validate import l2_normalize

log = logging.getLogger(__name__)

FUSE_WEIGHT = 0.5
"""Weight of ``psi(new(q))`` next to ``old(q)`` in the fused old-part query (set a priori)."""
NORMALIZATIONS = ("znorm-top", "znorm", "quantile", "affine", "identity")
COHORT_TOP = 100
MIN_PAIRS = 50
"""Fewer job pairs than this: use the psi artifact's stored calibration instead."""


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

    ``znorm-top`` / ``znorm``: a :class:`CohortNorm` with the pairs as cohort, and the
    job's pseudo-queries (:func:`~galleria.upgrade.pairs.load_pseudo_pairs`, images
    embedded with both models before the first item moves): a cohort from the start.
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
    if kind.startswith("znorm"):
        c_old, c_new = cohort_pairs(gallery.path)
        if len(c_old) >= MIN_PAIRS:
            return CohortNorm(c_old, c_new, top=COHORT_TOP if kind == "znorm-top" else None)
    elif len(ids) >= MIN_PAIRS:
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
