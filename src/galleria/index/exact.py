"""Exact inner-product search: chunked matrix multiply with bounded memory.

:func:`inner_product_topk` is the pure kernel; :class:`ExactIndex` is a thin
keyed wrapper around it (a dense ``(N, D)`` float32 table with swap-remove).

Kernel (chosen by profiling, see ``benchmarks/README.md``): the gallery is cut
into row blocks; for each block one float32 GEMM (numpy's BLAS ``sgemm``,
multi-threaded) writes a transposed ``(B, Qb)`` score block into one
preallocated buffer, then a pruned top-k selection runs on it in numpy.
Pruning: each query's ``B`` scores form ``B/g`` groups of ``g`` members
(stride ``B/g``); the group maxima are ``g - 1`` element-wise maxima of long
contiguous slabs (the reason for the transposed layout). The ``k`` largest group maxima are ``k``
distinct scores, so the k-th of them is a lower bound on the k-th best score;
only groups whose maximum reaches the running threshold are opened, and only
their members above it are merged into the running top-k. Few groups survive
after the first block, so selection costs about one read of the block.
Everything runs in one thread pool (BLAS); no second runtime spins against it.
The score block is sized to stay in cache (8 MB) and never
exceeds ``max_batch_bytes``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.index.base import Index, as_keys, check_k, pad_result
from galleria.index.topk import MIN_BLOCK_ROWS, scan_topk
from galleria.io.atomic import atomic_open, load_array
from galleria.types import SearchResult

log = logging.getLogger(__name__)

#: Default upper bound on the bytes of one score block.
DEFAULT_MAX_BATCH_BYTES = 256 << 20
#: Up to this many scores, one unblocked product (per-call overhead matters more).
_DIRECT_ELEMENTS = 1 << 16


def _small_scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``(Q, N)`` scores of a small product: one BLAS call, no blocking.

    One query is an ``sgemv`` (``vectors @ q``), run by the BLAS with the thread
    count the entry point chose (library code never changes it). Measured on a
    quiet machine, 1 x 4993 x 128 (real ROxford5k LOPQ): sgemv 28 us wall with 2
    BLAS threads, 82-102 us with 1; ``np.vecdot`` (one ``sdot`` per row, always
    single-threaded; the kernel used before) 106-134 us; ``faiss.IndexFlatIP``'s
    whole search 90-112 us. With a second process keeping one core busy, sgemv
    with 2 threads took 134-190 us and ``np.vecdot`` 137 us: no worse.
    """
    if queries.shape[0] == 1:
        return np.matmul(vectors, queries[0])[None, :]
    return queries @ vectors.T


def _small_topk(scores: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``kk`` of each row of a small ``(Q, N)`` score matrix, best first.

    A group-max bound instead of ``argpartition`` (45 us for 5k scores, against
    ~8 us here): the ``kk`` largest maxima of 64-member groups are ``kk``
    distinct scores, so the ``kk``-th of them bounds the ``kk``-th best score
    from below; only the few scores above it are sorted.
    """
    q, n = scores.shape
    length = n // 64
    if length >= 2 * kk:
        gmax = scores[:, : 64 * length].reshape(q, 64, length).max(axis=1)
        thr = np.partition(gmax, length - kk, axis=1)[:, length - kk]
    else:
        thr = np.full(q, -np.inf, np.float32)
    if q == 1:
        row = scores[0]
        idx = np.flatnonzero(row >= thr[0])
        o = np.argsort(-row[idx], kind="stable")[:kk]
        top = idx[o]
        return row[top][None, :], top[None, :]
    rr, cc = np.nonzero(scores >= thr[:, None])
    vals = scores[rr, cc]
    o = np.lexsort((cc, -vals, rr))
    rr, cc, vals = rr[o], cc[o], vals[o]
    counts = np.bincount(rr, minlength=q)
    rank = np.arange(rr.size) - (np.cumsum(counts) - counts)[rr]
    keep = rank < kk
    out_s = np.empty((q, kk), np.float32)
    out_r = np.empty((q, kk), np.int64)
    out_s[rr[keep], rank[keep]] = vals[keep]
    out_r[rr[keep], rank[keep]] = cc[keep]
    return out_s, out_r


def inner_product_topk(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int,
    *,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``vectors`` by inner product with each query.

    Args:
        queries: ``(Q, D)`` float32, C-contiguous.
        vectors: ``(N, D)`` float32, C-contiguous (rows may be a view).
        k: number of results, ``1 <= k``; at most ``N`` are returned.
        max_batch_bytes: upper bound on the score block (``Qb * B * 4`` bytes).

    Returns:
        ``(scores, rows)``: ``(Q, min(k, N))`` float32 scores, best first, and
        int64 row numbers into ``vectors``. Equal scores come in unspecified order.
    """
    q = queries.shape[0]
    n = vectors.shape[0]
    kk = min(k, n)
    if kk == 0:
        return np.empty((q, 0), np.float32), np.empty((q, 0), np.int64)
    if q * n <= _DIRECT_ELEMENTS:  # small problem: one product, no blocking overhead
        return _small_topk(_small_scores(queries, vectors), kk)

    def prepare(q0: int, q1: int):
        # transposed score block (gallery rows x queries): the GEMM is as fast or faster
        # this way round, and the group maximum becomes 63 element-wise maxima of long
        # contiguous slabs instead of millions of short reductions
        qblock_t = queries[q0:q1].T

        def fill(r0: int, w: int, out: np.ndarray) -> None:
            np.matmul(vectors[r0 : r0 + w], qblock_t, out=out)

        return fill

    return scan_topk(prepare, n, q, kk, max_batch_bytes=max_batch_bytes)


class VectorTable:
    """Keyed, growable ``(N, D)`` float32 table with O(1) swap-remove.

    Rows ``[0, N)`` of :attr:`vectors` are live and dense (no holes), so a scan
    needs no mask. Removing a key moves the last row into its slot: O(D) per
    removed key, never an O(N) copy.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self._vectors = np.empty((0, self.dim), np.float32)
        self._keys = np.empty((0,), np.int64)
        self._rows: dict[int, int] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def vectors(self) -> np.ndarray:
        """Live rows, ``(N, D)`` float32 (a view; invalidated by add/remove)."""
        return self._vectors[: self._n]

    @property
    def keys(self) -> np.ndarray:
        """Key of each live row, ``(N,)`` int64 (a view)."""
        return self._keys[: self._n]

    def contains(self, keys: np.ndarray) -> np.ndarray:
        rows = self._rows
        return np.fromiter((k in rows for k in keys.tolist()), dtype=bool, count=keys.size)

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, ``-1`` for unknown keys (and for ``-1``)."""
        get = self._rows.get
        flat = np.fromiter((get(k, -1) for k in keys.ravel().tolist()), np.int64, keys.size)
        return flat.reshape(keys.shape)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Append rows; ``keys`` must be new and unique (checked by the caller)."""
        n_new = keys.shape[0]
        need = self._n + n_new
        if need > self._vectors.shape[0]:
            cap = need if self._n == 0 else max(need, int(self._vectors.shape[0] * 1.5) + 16)
            grown = np.empty((cap, self.dim), np.float32)
            grown[: self._n] = self._vectors[: self._n]
            self._vectors = grown
            gk = np.empty((cap,), np.int64)
            gk[: self._n] = self._keys[: self._n]
            self._keys = gk
        self._vectors[self._n : need] = vectors
        self._keys[self._n : need] = keys
        self._rows.update(zip(keys.tolist(), range(self._n, need), strict=True))
        self._n = need

    def adopt(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Take ownership of ``(N,)`` keys and ``(N, D)`` vectors (empty table only, no copy)."""
        if self._n:
            raise RuntimeError("adopt() needs an empty table")
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._keys = np.ascontiguousarray(keys, dtype=np.int64)
        self._rows = dict(zip(self._keys.tolist(), range(self._keys.size), strict=True))
        self._n = int(self._keys.size)

    def remove(self, keys: np.ndarray) -> int:
        """Swap-remove known keys; return how many were removed."""
        rows = self.rows_of(np.unique(keys))
        rows = rows[rows >= 0]
        if rows.size == 0:
            return 0
        n_after = self._n - rows.size
        dead = np.zeros(self._n - n_after, dtype=bool)  # over the tail [n_after, n)
        tail_dead = rows[rows >= n_after] - n_after
        dead[tail_dead] = True
        holes = np.sort(rows[rows < n_after])
        movers = n_after + np.flatnonzero(~dead)  # live rows in the tail
        for key in self._keys[rows].tolist():
            del self._rows[key]
        if holes.size:
            self._vectors[holes] = self._vectors[movers]
            self._keys[holes] = self._keys[movers]
            self._rows.update(zip(self._keys[holes].tolist(), holes.tolist(), strict=True))
        self._n = n_after
        if self._vectors.shape[0] > 64 and self._n < self._vectors.shape[0] // 4:
            self._vectors = self._vectors[: max(self._n * 2, 16)].copy()
            self._keys = self._keys[: self._vectors.shape[0]].copy()
        return int(rows.size)

    def check_new(self, keys: np.ndarray) -> None:
        """InputError when any key is already present."""
        if self._n == 0:
            return
        present = keys[self.contains(keys)]
        if present.size:
            raise InputError(
                f"{present.size} key(s) already in the index, e.g. {present[:5].tolist()}; "
                "remove them first to replace their vectors"
            )

    def copy(self) -> VectorTable:
        """An independent copy of the live rows (no spare capacity)."""
        out = VectorTable(self.dim)
        out._vectors = self._vectors[: self._n].copy()
        out._keys = self._keys[: self._n].copy()
        out._rows = dict(self._rows)
        out._n = self._n
        return out

    def compact(self) -> None:
        """Release spare capacity."""
        if self._vectors.shape[0] != self._n:
            self._vectors = self._vectors[: self._n].copy()
            self._keys = self._keys[: self._n].copy()


def _write_npy(array: np.ndarray) -> Any:
    def write(path: Path) -> None:
        with atomic_open(path, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    return write


def _read_npy(path: Path, *, dtype: type, ndim: int) -> np.ndarray:
    try:
        arr = load_array(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable .npy file: {exc}") from exc
    if arr.dtype != dtype or arr.ndim != ndim:
        raise FormatError(f"{path} holds {arr.dtype} {arr.shape}, expected {ndim}-D {dtype}")
    return arr


class ExactIndex(Index):
    """Exact inner-product index (our own kernel, no FAISS), memory-bounded search.

    Args:
        dim: vector dimension D.
        fingerprint: model fingerprint of the vectors (checked on load).
        max_batch_bytes: upper bound on the score block held during a search.
    """

    type_name = "exact"
    format_version = 1

    def __init__(
        self,
        dim: int,
        *,
        fingerprint: str | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        super().__init__(dim, fingerprint=fingerprint)
        if isinstance(max_batch_bytes, bool) or int(max_batch_bytes) < 4 * MIN_BLOCK_ROWS:
            raise InputError(f"max_batch_bytes must be >= {4 * MIN_BLOCK_ROWS}")
        self.max_batch_bytes = int(max_batch_bytes)
        self._table = VectorTable(self.dim)

    def params(self) -> dict[str, Any]:
        return {"max_batch_bytes": self.max_batch_bytes}

    def __len__(self) -> int:
        return len(self._table)

    def keys(self) -> np.ndarray:
        return self._table.keys.copy()

    def vectors(self) -> np.ndarray:
        """Live vectors ``(N, D)`` in the order of :meth:`keys` (read-only view)."""
        v = self._table.vectors.view()
        v.flags.writeable = False
        return v

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        x = self._vectors(vectors)
        k = as_keys(keys, n=x.shape[0])
        self._table.check_new(k)
        self._table.add(k, x)

    def copy(self) -> ExactIndex:
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out._table = self._table.copy()
        return out

    def remove(self, keys: np.ndarray) -> int:
        return self._table.remove(as_keys(keys, unique=False))

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        k = check_k(k)
        q = self._queries(queries)
        if len(self._table) == 0:
            return SearchResult.empty(q.shape[0], k)
        scores, rows = inner_product_topk(
            q, self._table.vectors, k, max_batch_bytes=self.max_batch_bytes
        )
        return pad_result(scores, self._table.keys[rows], k)

    def save(self, path: str | os.PathLike[str]) -> None:
        self._commit(
            path,
            {
                "vectors": (".npy", _write_npy(self._table.vectors)),
                "keys": (".npy", _write_npy(self._table.keys)),
            },
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        dim: int | None = None,
    ) -> ExactIndex:
        header = cls._load_header(path, fingerprint=fingerprint, dim=dim)
        p = Path(path)
        files = header.get("files", {})
        if set(files) != {"vectors", "keys"}:
            raise FormatError(f"{p}/header.json must name 'vectors' and 'keys' files")
        vectors = _read_npy(p / files["vectors"], dtype=np.float32, ndim=2)
        keys = _read_npy(p / files["keys"], dtype=np.int64, ndim=1)
        if vectors.shape != (header["ntotal"], header["dim"]) or keys.shape != (header["ntotal"],):
            raise FormatError(
                f"{p}: arrays {vectors.shape} / {keys.shape} do not match the header "
                f"(ntotal={header['ntotal']}, dim={header['dim']})"
            )
        params = header["params"]
        index = cls(
            int(header["dim"]),
            fingerprint=header.get("fingerprint"),
            max_batch_bytes=int(params.get("max_batch_bytes", DEFAULT_MAX_BATCH_BYTES)),
        )
        index.generation = int(header.get("generation", 0))
        if keys.size:
            index._table.adopt(as_keys(keys), vectors)
        return index
