"""Closed-form linear transforms: mean-centring, PCA truncation, PCA-whitening.

The learning is pure functions (:func:`~galleria.transforms.whiten.learn_pca`,
:func:`apply_linear` and :func:`~galleria.transforms.whiten.learn_pca_whitening`); the
classes are thin estimator wrappers. PCA and PCA-whitening are nested:
components are sorted by decreasing eigenvalue, so ``transform(X, dim=d)`` is
the same as fitting with ``dim=d``.

Whitening divides component ``i`` by ``sqrt(lambda_i + shrinkage * mean(lambda))``
(the mean over all ``D`` eigenvalues): ``shrinkage=0`` is full whitening
(identity covariance on the fit data), ``shrinkage=1`` ("mean") is the
regularised variant that keeps low-variance (noisy) directions from being
blown up.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from galleria.errors import InputError
from galleria.transforms.base import Transform
from galleria.transforms.whiten import learn_pca, learn_pca_whitening

if TYPE_CHECKING:
    from galleria.train.loop import ProgressFactory

logger = logging.getLogger(__name__)

__all__ = ["PCA", "Center", "PCAWhiten", "apply_linear", "learn_pca"]


def apply_linear(X: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``(X - mean) @ components.T``: ``(N, D)`` rows, ``(d, D)`` components -> ``(N, d)``."""
    X32 = np.asarray(X, dtype=np.float32) - np.asarray(mean, dtype=np.float32)
    return X32 @ np.asarray(components, dtype=np.float32).T


def _check_dim(kind: str, dim: int | None, D: int) -> int:
    if dim is None:
        return D
    if not 1 <= int(dim) <= D:
        raise InputError(f"{kind!r}: dim={dim} must be in 1..{D} (the input dimension)")
    return int(dim)


class Center(Transform):
    """Mean-centring: ``x - mean(gallery)``. Output dimension = input dimension."""

    kind = "center"

    def __init__(self, *, dim: int | None = None) -> None:
        self.dim = dim

    def _fit(self, X: np.ndarray, *, progress: ProgressFactory | None) -> None:
        if self.dim is not None and int(self.dim) != X.shape[1]:
            raise InputError(
                f"'center' keeps the dimension: dim={self.dim} but the input is {X.shape[1]}-d"
            )
        self.mean_ = X.astype(np.float64).mean(axis=0).astype(np.float32)
        self.output_dim_ = int(X.shape[1])

    def _project(self, X: np.ndarray, dim: int) -> np.ndarray:
        return X - self.mean_

    def _get_state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.mean_ = state["mean"].astype(np.float32)


class PCA(Transform):
    """PCA truncation to ``dim`` components (centred, not scaled). Nested."""

    kind = "pca"
    nested = True

    def __init__(self, *, dim: int | None = None) -> None:
        self.dim = dim

    def _fit(self, X: np.ndarray, *, progress: ProgressFactory | None) -> None:
        d = _check_dim(self.kind, self.dim, X.shape[1])
        mean, eigvals, comps = learn_pca(X)
        self.mean_ = mean.astype(np.float32)
        self.components_ = comps[:d].astype(np.float32)
        self.explained_variance_ = eigvals[:d].astype(np.float32)
        self.output_dim_ = d

    def _project(self, X: np.ndarray, dim: int) -> np.ndarray:
        return apply_linear(X, self.mean_, self.components_[:dim])

    def _get_state(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean_,
            "components": self.components_,
            "explained_variance": self.explained_variance_,
        }

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.mean_ = state["mean"]
        self.components_ = state["components"]
        self.explained_variance_ = state["explained_variance"]


class PCAWhiten(Transform):
    """PCA-whitening to ``dim`` components (:mod:`galleria.transforms.whiten`). Nested.

    Args:
        dim: number of components (default: all).
        shrinkage: ``0`` = full whitening; ``"mean"`` (= 1.0) or a float ``a``
            divides by ``sqrt(lambda + a * mean(lambda))`` (regularised).

    Learned: ``mean_ (D,)`` and ``projection_ (D, dim)`` (eigenvectors times the
    whitening scales); the output is ``(x - mean_) @ projection_[:, :d]``.
    """

    kind = "pca-whiten"
    nested = True

    def __init__(self, *, dim: int | None = None, shrinkage: float | str = 0.0) -> None:
        self.dim = dim
        self.shrinkage = shrinkage

    def _fit(self, X: np.ndarray, *, progress: ProgressFactory | None) -> None:
        d = _check_dim(self.kind, self.dim, X.shape[1])
        self.mean_, self.projection_ = learn_pca_whitening(X, dim=d, shrinkage=self.shrinkage)
        self.output_dim_ = d

    def _project(self, X: np.ndarray, dim: int) -> np.ndarray:
        return apply_linear(X, self.mean_, self.projection_[:, :dim].T)

    def _get_state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "projection": self.projection_}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.mean_ = state["mean"]
        self.projection_ = state["projection"]
