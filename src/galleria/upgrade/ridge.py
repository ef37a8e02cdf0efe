"""A closed-form psi: ridge regression of old-model embeddings on new-model ones.

The online psi of a backfill (:mod:`galleria.upgrade.online`) is refitted many
times while the job's (old, new) pairs accumulate, from a few hundred pairs to
tens of thousands, on the CPU that also re-embeds the gallery. A linear map
with an intercept, fitted in closed form, costs one SVD of the ``(n, D_new)``
pair matrix and needs no epochs, learning rate or early stopping::

    psi(x) = normalize((normalize(x) - mu_new) W + mu_old)

``W`` minimises ``||(N - mu_new) W - (O - mu_old)||^2 + alpha ||W||^2``. The
ridge strength ``alpha`` is chosen per fit by generalised cross-validation
over a fixed grid (relative to the mean squared singular value), computed
from the same SVD: no held-out split, no labels.

It is a :class:`~galleria.upgrade.crossmap.CrossModelMap` of kind
``psi-ridge`` (same artifact, fingerprints and checks as the MLP psi; loaded
by :func:`galleria.upgrade.psi.load_cross_map`); its weights are one linear
layer in the MLP layout, so ``transform`` is the shared one.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from galleria.errors import InputError
from galleria.upgrade.crossmap import CrossModelMap

log = logging.getLogger(__name__)

ALPHA_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
"""Ridge strengths tried, as multiples of the mean squared singular value of the
centred new-model pairs (scale-free: the same grid fits 200 or 20k pairs)."""


def ridge_gcv(
    x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...] = ALPHA_GRID
) -> tuple[np.ndarray, float, dict[str, float]]:
    """Ridge ``x -> y`` (both centred) with ``alpha`` chosen by generalised cross-validation.

    Args:
        x: ``(n, d)`` centred inputs.
        y: ``(n, e)`` centred targets.
        alphas: relative strengths (times ``mean(s^2)``, ``s`` the singular values of x).

    Returns:
        ``(W (d, e), alpha (absolute), {relative alpha: GCV score})``.
    """
    n = x.shape[0]
    u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    uty = u.T @ y.astype(np.float64)
    s2 = s * s
    scale = float(s2.mean()) if s2.size else 1.0
    # the residual outside span(u) does not depend on alpha
    base = float(np.sum(y.astype(np.float64) ** 2) - np.sum(uty ** 2))
    scores: dict[str, float] = {}
    best: tuple[float, float] | None = None
    for rel in alphas:
        a = rel * scale
        shrink = s2 / (s2 + a)
        resid = base + float(np.sum(((1.0 - shrink)[:, None] * uty) ** 2))
        dof = float(shrink.sum())
        gcv = resid / n / max(1.0 - dof / n, 1e-6) ** 2
        scores[f"{rel:g}"] = gcv
        if best is None or gcv < best[0]:
            best = (gcv, a)
    assert best is not None
    a = best[1]
    w = vt.T @ ((s / (s2 + a))[:, None] * uty)
    return w.astype(np.float32), float(a), scores


class RidgePsi(CrossModelMap):
    """psi as a ridge regression with an intercept (see the module docstring).

    Args:
        alphas: relative ridge strengths tried by GCV (``()``: the default grid).
        max_pairs: fit on at most this many pairs (a seeded sample; bounds the cost).
        seed: seeds that sample.
    """

    kind: ClassVar[str] = "psi-ridge"

    def __init__(self, *, alphas: tuple[float, ...] = (), max_pairs: int = 20000,
                 seed: int = 0) -> None:
        self.alphas = tuple(float(a) for a in alphas)
        self.max_pairs = max_pairs
        self.seed = seed

    def get_params(self) -> dict[str, Any]:
        return {"alphas": list(self.alphas), "max_pairs": self.max_pairs, "seed": self.seed}

    def fit(
        self,
        new: object,
        old: object,
        *,
        labels: Any = None,
        new_fingerprint: str | None = None,
        old_fingerprint: str | None = None,
        progress: Any = None,
    ) -> RidgePsi:
        """Fit on ``(N, D_new)`` / ``(N, D_old)`` pairs of the same images (no labels)."""
        if labels is not None:
            raise InputError("the ridge psi is label-free: it takes no labels")
        if self.max_pairs < 8:
            raise InputError(f"max_pairs must be >= 8, got {self.max_pairs}")
        n, o = self._prepare_fit(new, old, new_fingerprint, old_fingerprint)
        total = n.shape[0]
        n, o, alpha, scores = self._fit_linear(n, o)
        fitted = self.transform(n)
        self.info_ = {"n_pairs": int(total), "fitted_on": int(n.shape[0]),
                      "alpha": alpha, "gcv": scores,
                      "train_cosine_to_old": float(np.mean(np.sum(fitted * o, axis=1)))}
        log.info("ridge psi on %d pairs: alpha %.3g, train cos(psi(new), old) = %.4f",
                 n.shape[0], alpha, self.info_["train_cosine_to_old"])
        return self

    def _fit_linear(self, x: np.ndarray, y: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, float, dict[str, float]]:
        """Sets ``weights_`` to the ridge map ``x -> y`` with an intercept (one linear
        layer, ``(out, in)`` layout) on at most :attr:`max_pairs` seeded pairs; returns
        ``(x used, y used, alpha, GCV scores)``."""
        total = x.shape[0]
        if total > self.max_pairs:
            pick = np.sort(np.random.default_rng(self.seed).choice(total, self.max_pairs,
                                                                  replace=False))
            x, y = x[pick], y[pick]
        mu_x = x.mean(axis=0)
        mu_y = y.mean(axis=0)
        w, alpha, scores = ridge_gcv(x - mu_x, y - mu_y, self.alphas or ALPHA_GRID)
        # f(x) = (x - mu_x) W + mu_y = x W + (mu_y - mu_x W): one linear layer, (out, in)
        bias = (mu_y - mu_x @ w).astype(np.float32)
        self.weights_ = [(np.ascontiguousarray(w.T), bias)]
        return x, y, alpha, scores
