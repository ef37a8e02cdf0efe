"""Checks applied where data enters galleria (public entry points)."""

from __future__ import annotations

import numpy as np

from galleria.errors import InputError


def as_embeddings(x: object, *, name: str = "embeddings", dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous ``(N, D)`` float32 array, or raise InputError.

    Rejects non-2-D input, an empty batch, NaN/inf values and (when ``dim`` is
    given) a dimension other than ``dim``. A single vector ``(D,)`` is promoted
    to ``(1, D)``.
    """
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"{name} must have shape (N, D); got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dim is not None and arr.shape[1] != dim:
        raise InputError(f"{name} have dimension {arr.shape[1]}, expected {dim}")
    # sum() is finite iff every entry is (checked in row chunks: no (N, D) bool temporary)
    step = max(1, (1 << 22) // max(1, arr.shape[1]))
    for start in range(0, arr.shape[0], step):
        chunk = arr[start : start + step]
        if not np.isfinite(chunk.sum(axis=1, dtype=np.float64)).all():
            bad = int(sum((~np.isfinite(arr[s : s + step])).any(axis=1).sum()
                          for s in range(0, arr.shape[0], step)))
            raise InputError(f"{name} contain NaN or inf in {bad} of {arr.shape[0]} rows")
    return arr


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of an ``(N, D)`` array (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)
