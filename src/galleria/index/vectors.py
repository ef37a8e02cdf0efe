"""Full-precision vectors kept outside RAM: the vector-source protocol and mapped row files.

A compressed index (:mod:`galleria.index.compressed`) scores its compressed
copy and re-scores a short list of candidates exactly in float32. Those float32
vectors must not be held twice in memory, so the index reads them from a
:class:`VectorSource`:

* attached by the gallery store (``index.attach_source(src)``): the store's
  memory-mapped segment files already hold every vector;
* or, standalone, a :class:`MappedRows` file the index owns (a scratch file in
  ``scratch_dir``, unlinked as soon as it is mapped so nothing is left behind
  after a crash; saved with the index as ``vectors.<id>.npy``; a loaded index
  maps its saved file read-only and copies it to a scratch file only when it is
  first modified).

Memory-mapped pages are file-backed page cache: the kernel pages them in on
demand and can drop them under memory pressure, unlike anonymous memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.io.atomic import load_array

#: Rows copied per step when a mapped file grows or is written out (bounded extra memory).
_COPY_BYTES = 64 << 20


@runtime_checkable
class VectorSource(Protocol):
    """Full-precision vectors by key (implemented by the gallery store).

    ``get(keys)`` receives ``(n,)`` int64 keys, unique and sorted ascending, every
    one of them currently in the index, and returns their ``(n, D)`` float32
    vectors in that order (a new array or a read-only view). It is called from
    search threads, possibly several at once, so it must be thread safe and must
    not change while a search that uses it runs (the store attaches a source to
    an index copy that belongs to one immutable view).
    """

    dim: int

    def get(self, keys: np.ndarray) -> np.ndarray: ...


class ArraySource:
    """A :class:`VectorSource` over ``(N,)`` keys and an ``(N, D)`` array (may be a memmap)."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, np.int64)
        if vectors.ndim != 2 or vectors.shape[0] != keys.shape[0]:
            raise InputError(f"ArraySource: {keys.shape[0]} keys for vectors {vectors.shape}")
        order = np.argsort(keys, kind="stable")
        self._sorted = keys[order]
        if self._sorted.size > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            raise InputError("ArraySource: duplicate keys")
        self._order = order
        self._vectors = vectors
        self.dim = int(vectors.shape[1])

    def get(self, keys: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self._sorted, keys)
        pos = np.minimum(pos, max(0, self._sorted.size - 1))
        if keys.size and (self._sorted.size == 0 or (self._sorted[pos] != keys).any()):
            raise KeyError("ArraySource.get: unknown key(s)")
        rows = self._order[pos]
        return np.ascontiguousarray(self._vectors[rows], dtype=np.float32)


def _scratch_map(dim: int, rows: int, scratch_dir: str | None) -> np.ndarray:
    """A writable ``(rows, dim)`` float32 map of a fresh scratch file (already unlinked)."""
    if rows == 0:
        return np.empty((0, dim), np.float32)
    fd, path = tempfile.mkstemp(prefix="galleria-f32-", suffix=".bin", dir=scratch_dir)
    try:
        os.ftruncate(fd, rows * dim * 4)
        arr = np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, dim))
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps the data; nothing to clean up after a crash
    return arr


def _copy_rows(dst: np.ndarray, src: np.ndarray, n: int) -> None:
    step = max(1, _COPY_BYTES // max(1, src.shape[1] * 4))
    for r0 in range(0, n, step):
        dst[r0 : min(n, r0 + step)] = src[r0 : min(n, r0 + step)]


class MappedRows:
    """Growable ``(N, D)`` float32 rows in a memory-mapped file (the index's own copy).

    Rows are addressed by position and kept aligned with the index's compressed
    table (append, and swap-remove moves). Not thread safe for mutation; reads
    (:meth:`take`) may run concurrently with each other.
    """

    def __init__(self, dim: int, *, scratch_dir: str | None = None) -> None:
        self.dim = int(dim)
        self.scratch_dir = scratch_dir
        self._data: np.ndarray = np.empty((0, self.dim), np.float32)
        self._n = 0
        self._readonly = False

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> np.ndarray:
        """Live rows ``(N, D)`` (a read-only view of the mapping)."""
        v = self._data[: self._n].view(np.ndarray)
        v.flags.writeable = False
        return v

    def take(self, rows: np.ndarray) -> np.ndarray:
        """``(n, D)`` float32 copies of the given rows."""
        return np.asarray(self._data[rows], dtype=np.float32)

    def _writable(self, capacity: int) -> None:
        """Ensure a private writable mapping of at least ``capacity`` rows."""
        if not self._readonly and capacity <= self._data.shape[0]:
            return
        cap = max(capacity, int(self._data.shape[0] * 1.5) + 16) if self._n else capacity
        grown = _scratch_map(self.dim, cap, self.scratch_dir)
        _copy_rows(grown, self._data, self._n)
        self._data = grown
        self._readonly = False

    def append(self, x: np.ndarray) -> None:
        need = self._n + x.shape[0]
        self._writable(need)
        self._data[self._n : need] = x
        self._n = need

    def move(self, dst: np.ndarray, src: np.ndarray, n_after: int) -> None:
        """Copy rows ``src`` into rows ``dst`` (swap-remove), then keep ``n_after`` rows."""
        if dst.size:
            self._writable(self._n)
            self._data[dst] = self._data[src]
        self._n = n_after

    def copy(self) -> MappedRows:
        """An independent copy in a new scratch file (a read-only mapping is shared)."""
        out = MappedRows(self.dim, scratch_dir=self.scratch_dir)
        if self._readonly:  # the saved file never changes: share the read-only mapping
            out._data, out._n, out._readonly = self._data, self._n, True
            return out
        out._data = _scratch_map(self.dim, self._n, self.scratch_dir)
        _copy_rows(out._data, self._data, self._n)
        out._n = self._n
        return out

    @classmethod
    def open(cls, path: Path, *, n: int, dim: int, scratch_dir: str | None = None) -> MappedRows:
        """Map a saved ``(n, dim)`` float32 ``.npy`` file read-only (copied on first change)."""
        try:
            arr = load_array(path, mmap_mode="r" if n else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path} is not a readable .npy file: {exc}") from exc
        if arr.dtype != np.float32 or arr.shape != (n, dim):
            raise FormatError(
                f"{path} holds {arr.dtype} {arr.shape}, expected ({n}, {dim}) float32")
        out = cls(dim, scratch_dir=scratch_dir)
        if n:
            out._data, out._n, out._readonly = arr, n, True
        return out
