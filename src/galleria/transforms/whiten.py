"""PCA-whitening as two pure functions, in the ASMK / ``how`` style.

:func:`learn_pca_whitening` returns ``(mean, P)``; :func:`apply_pca_whitening`
computes ``normalise((X - mean) @ P)``. Component ``i`` (eigenvalues in
decreasing order) is scaled by ``1 / sqrt(lambda_i + shrinkage * mean(lambda))``:

* ``shrinkage=0`` — full whitening (identity covariance on the learning data);
* ``shrinkage=1`` (or ``"mean"``) — the regularised variant, which keeps
  low-variance, noisy directions from being blown up.

The eigendecomposition is :func:`learn_pca` (covariance
with ``N - 1``, eigenvector signs fixed so the largest-magnitude entry is positive),
the one every PCA and whitening in galleria uses.
Estimator classes can wrap these without changing the numbers.
"""

from __future__ import annotations

import numpy as np

from galleria.errors import InputError
from galleria.validate import as_embeddings, l2_normalize


def learn_pca(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, eigenvalues and eigenvectors of the covariance of ``(N, D)`` rows.

    Returns:
        ``mean (D,)`` float64, ``eigvals (D,)`` float64 in decreasing order
        (covariance with ``N - 1`` in the denominator, clipped at 0) and
        ``components (D, D)`` float64 whose rows are the eigenvectors; each row's
        sign is fixed so that its largest-magnitude entry is positive.
    """
    X64 = np.asarray(X, dtype=np.float64)
    n = X64.shape[0]
    mean = X64.mean(axis=0)
    Xc = X64 - mean
    cov = (Xc.T @ Xc) / max(n - 1, 1)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals = np.clip(eigvals[order], 0.0, None)
    comps = eigvecs[:, order].T
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return mean, eigvals, comps * signs[:, None]


def learn_pca_whitening(
    X: np.ndarray, *, dim: int | None = None, shrinkage: float | str = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Learn PCA-whitening from ``(N, D)`` row vectors.

    Args:
        X: ``(N, D)`` learning vectors (e.g. the gallery descriptors).
        dim: keep the first ``dim`` components (default ``D``).
        shrinkage: ``0`` full whitening, ``1`` / ``"mean"`` regularised
            whitening; any ``s >= 0`` divides by ``sqrt(lambda + s * mean(lambda))``.

    Returns:
        ``mean (D,)`` float32 and projection ``P (D, dim)`` float32.
    """
    x = as_embeddings(X, name="whitening data").astype(np.float64)
    n, d = x.shape
    if n < 2:
        raise InputError(f"PCA-whitening needs at least 2 vectors, got {n}")
    dim = d if dim is None else int(dim)
    if not 1 <= dim <= d:
        raise InputError(f"dim={dim} must be in 1..{d} (the input dimension)")
    if isinstance(shrinkage, str):
        if shrinkage != "mean":
            raise InputError(f"shrinkage must be a number >= 0 or 'mean', got {shrinkage!r}")
        shrinkage = 1.0
    if not (shrinkage >= 0 and np.isfinite(shrinkage)):
        raise InputError(f"shrinkage must be a finite number >= 0, got {shrinkage}")
    mean, eigvals, comps = learn_pca(x)
    eigvecs = comps.T
    floor = max(float(eigvals.max()), 1e-30) * 1e-12
    scale = 1.0 / np.sqrt(np.maximum(eigvals + shrinkage * eigvals.mean(), floor))
    P = eigvecs[:, :dim] * scale[:dim]
    return mean.astype(np.float32), P.astype(np.float32)


def apply_pca_whitening(X: np.ndarray, mean: np.ndarray, P: np.ndarray) -> np.ndarray:
    """``normalise((X - mean) @ P)``: ``(N, D) -> (N, dim)`` float32, rows L2-normalised."""
    P = np.asarray(P, dtype=np.float32)
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    if P.ndim != 2 or mean.shape != (P.shape[0],):
        raise InputError(f"whitening needs mean (D,) and P (D, d); got {mean.shape}, {P.shape}")
    x = as_embeddings(X, name="vectors", dim=P.shape[0])
    return l2_normalize((x - mean) @ P)
