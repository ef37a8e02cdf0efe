"""The index contract shared by every backend.

An index maps int64 keys to ``(D,)`` float32 vectors and answers inner-product
top-k queries (vectors are L2-normalised upstream, so inner product = cosine).
Every backend returns :class:`~galleria.types.SearchResult` with int64 keys and
``-1`` / ``-inf`` padding when fewer than ``k`` items exist.

Persistence: ``save(dir)`` writes ``header.json`` (type, format version,
params, fingerprint, dim, ntotal, generation) plus array/FAISS files, each
atomically; ``load(dir, fingerprint=..., dim=...)`` checks them.
"""

from __future__ import annotations

import abc
import os
from typing import Any, ClassVar

import numpy as np

from galleria.types import SearchResult


class Index(abc.ABC):
    """Abstract inner-product index over int64 keys."""

    type_name: ClassVar[str]
    format_version: ClassVar[int] = 1

    def __init__(self, dim: int, *, fingerprint: str | None = None) -> None:
        self.dim = int(dim)
        self.fingerprint = fingerprint
        #: Store generation this index reflects (set by the gallery; see store.gallery).
        self.generation = 0

    @abc.abstractmethod
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``(N,)`` int64 keys with their ``(N, D)`` vectors. Keys must be new."""

    @abc.abstractmethod
    def remove(self, keys: np.ndarray) -> int:
        """Remove keys (unknown keys are ignored); return how many were removed."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` by inner product for ``(Q, D)`` queries -> ``(Q, k)`` result."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def keys(self) -> np.ndarray:
        """All keys currently in the index, ``(N,)`` int64."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index into directory ``path`` (atomically per file)."""

    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        dim: int | None = None,
    ) -> Index:
        """Read an index written by :meth:`save`; check fingerprint and dim when given."""

    def params(self) -> dict[str, Any]:
        """Constructor parameters recorded in the header."""
        return {}
