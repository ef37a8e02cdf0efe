"""The store's float32 vectors as a vector source for compressed indexes.

A compressed index (``exact-bf16`` / ``exact-int8``) keeps only its codes in
RAM and re-scores a short list of candidates against the float32 vectors
(:class:`galleria.index.vectors.VectorSource`). The gallery's segment files
already hold every vector, so the store attaches a :class:`SegmentSource` that
reads them through read-only memory maps instead of a second copy.

A source describes one committed state (the key -> (file, row) table read in
one read transaction) and never changes afterwards, so it is thread safe and
stays valid for the view it belongs to: segment files are immutable, and a file
retired by compaction is deleted only after a grace period (a mapping keeps
its data readable even then).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from galleria.errors import FormatError
from galleria.store.segments import open_array


class SegmentSource:
    """Vectors of one global space at one committed state, read from its segment files.

    Args:
        dim: vector dimension D.
        keys: ``(N,)`` int64 keys, sorted ascending, unique.
        files: ``(N,)`` index into ``arrays`` of each key's segment.
        rows: ``(N,)`` row of each key in its segment.
        arrays: the memory-mapped ``(n_i, D)`` float32 segment arrays.
    """

    def __init__(self, dim: int, keys: np.ndarray, files: np.ndarray, rows: np.ndarray,
                 arrays: list[np.ndarray]) -> None:
        self.dim = int(dim)
        self._keys, self._files, self._rows, self._arrays = keys, files, rows, arrays

    def __len__(self) -> int:
        return int(self._keys.size)

    @property
    def keys(self) -> np.ndarray:
        """Sorted keys this source holds (read-only)."""
        return self._keys

    def get(self, keys: np.ndarray) -> np.ndarray:
        """``(n, D)`` float32 vectors of ``keys`` (``(n,)`` int64, sorted, unique)."""
        keys = np.asarray(keys, np.int64)
        pos = np.searchsorted(self._keys, keys)
        pos = np.minimum(pos, max(0, self._keys.size - 1))
        if keys.size and (self._keys.size == 0 or (self._keys[pos] != keys).any()):
            bad = keys if self._keys.size == 0 else keys[self._keys[pos] != keys]
            raise FormatError(f"the store has no vector for key(s) {bad[:5].tolist()} "
                              "in this state")
        out = np.empty((keys.size, self.dim), np.float32)
        f = self._files[pos]
        r = self._rows[pos]
        if len(self._arrays) == 1:
            out[:] = self._arrays[0][r]
            return out
        for i in np.unique(f).tolist():
            sel = np.flatnonzero(f == i)
            out[sel] = self._arrays[i][r[sel]]
        return out


def space_source(c: sqlite3.Connection, root: Path, space: str, dim: int) -> SegmentSource:
    """A :class:`SegmentSource` of ``space`` at the state ``c``'s read transaction sees.

    The segment files are mapped, not read (their checksums are verified when the
    space is loaded or by ``galleria check``); a size mismatch is a FormatError.
    """
    tab = np.array(c.execute("SELECT key, segment, row FROM vectors WHERE space=? ORDER BY key",
                             (space,)).fetchall(), dtype=np.int64).reshape(-1, 3)
    used = np.unique(tab[:, 1])  # only segments that hold a live vector are mapped
    found = {int(s): (str(f), int(nb)) for s, f, nb in c.execute(
        "SELECT segment, file, nbytes FROM segments WHERE space=?", (space,))}
    arrays = []
    for s in used.tolist():
        if s not in found:
            raise FormatError(f"space {space!r}: vectors reference segment {s}, which the "
                              "database does not list; run `galleria repair`")
        f, nb = found[s]
        a = open_array(root / f, nb)
        if a.ndim != 2 or a.shape[1] != dim or a.dtype != np.float32:
            raise FormatError(f"{root / f}: {a.dtype} {a.shape} is not (n, {dim}) float32")
        arrays.append(a)
    files = np.searchsorted(used, tab[:, 1])
    return SegmentSource(dim, np.ascontiguousarray(tab[:, 0]), files,
                         np.ascontiguousarray(tab[:, 2]), arrays)


class ChainSource:
    """``base`` plus vectors added since (``extra_keys`` sorted, ``extra (n, D)``): the
    source of a base index merged outside a read transaction."""

    def __init__(self, base: object, extra_keys: np.ndarray, extra: np.ndarray) -> None:
        order = np.argsort(extra_keys, kind="stable")
        self._base = base
        self._keys = np.asarray(extra_keys, np.int64)[order]
        self._extra = np.asarray(extra, np.float32)[order]
        self.dim = int(self._extra.shape[1])

    def get(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, np.int64)
        pos = np.minimum(np.searchsorted(self._keys, keys), max(0, self._keys.size - 1))
        mine = (self._keys[pos] == keys) if self._keys.size else np.zeros(keys.size, bool)
        out = np.empty((keys.size, self.dim), np.float32)
        out[mine] = self._extra[pos[mine]]
        if not mine.all():
            out[~mine] = self._base.get(keys[~mine])  # type: ignore[attr-defined]
        return out
