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
from galleria.io.atomic import atomic_open
from galleria.threads import single_threaded_blas
from galleria.types import SearchResult

log = logging.getLogger(__name__)

#: Default upper bound on the bytes of one score block.
DEFAULT_MAX_BATCH_BYTES = 256 << 20
#: Preferred score-block size. Profiled on a quiet machine (1000 queries, k=10, 2 threads,
#: real-derived vectors): 8 MB gave 6.7k / 820 / 920 q/s at 100k x 128 / 1M x 128 /
#: 100k x 1280 against 5.9k / 780 / 880 for 32 MB; 4 MB was slower again. (A variant that
#: split the queries over two threads with single-threaded BLAS gained nothing here.)
_CACHE_BLOCK_BYTES = 8 << 20
_MIN_BLOCK_ROWS = 1024
#: Up to this many scores, one unblocked product (per-call overhead matters more).
_DIRECT_ELEMENTS = 1 << 16
#: Up to this many multiply-adds, a single-threaded product.
_SINGLE_THREAD_MACS = 1 << 22
#: Group count g: a block of B columns is pruned through g-member groups of stride B/g.
_GROUPS = 64


def _block_shape(q: int, n: int, k: int, max_batch_bytes: int) -> tuple[int, int]:
    """``(query block, gallery block)`` sizes for a ``(q, n)`` score matrix.

    The gallery block is a multiple of ``_GROUPS`` with at least ``4 * k`` groups
    (so pruning works) unless the gallery is smaller; ``qb * rows * 4`` stays
    within ``max_batch_bytes``.
    """
    budget = max(int(max_batch_bytes), 4 * _MIN_BLOCK_ROWS)
    min_rows = min(-(-n // _GROUPS) * _GROUPS, max(_MIN_BLOCK_ROWS, 4 * k * _GROUPS))
    # queries per block: as many as keep a minimum-width block in cache (a large k needs
    # wide blocks: top-200 over 1M x 32-d ran 2.5 s with 1000-query blocks of 204 MB,
    # 1.2 s with 40-query blocks of 8 MB)
    qb = max(1, min(q, _CACHE_BLOCK_BYTES // (4 * min_rows), budget // (4 * min_rows)))
    rows = max(min(budget, _CACHE_BLOCK_BYTES) // (4 * qb), min_rows)
    rows = min(rows, budget // (4 * qb), -(-n // _GROUPS) * _GROUPS)
    rows = max(_GROUPS, rows // _GROUPS * _GROUPS)
    return qb, rows


def _merge(
    best_s: np.ndarray,
    best_r: np.ndarray,
    thr: np.ndarray,
    rows: np.ndarray,
    vals: np.ndarray,
    cols: np.ndarray,
) -> None:
    """Merge candidates ``(rows[i], vals[i], cols[i])`` (sorted by row) into the running top-k.

    ``best_s``/``best_r`` are ``(m, k)``; ``thr`` (the k-th best score per query)
    is updated in place.
    """
    if rows.size == 0:
        return
    m, k = best_s.shape
    counts = np.bincount(rows, minlength=m)
    act = np.flatnonzero(counts)
    slot = np.cumsum(counts > 0) - 1  # query -> row of the merge table
    start = np.cumsum(counts) - counts
    width = k + int(counts.max())
    table_s = np.full((act.size, width), -np.inf, np.float32)
    table_r = np.full((act.size, width), -1, np.int64)
    table_s[:, :k] = best_s[act]
    table_r[:, :k] = best_r[act]
    pos = np.arange(rows.size) - start[rows] + k
    table_s[slot[rows], pos] = vals
    table_r[slot[rows], pos] = cols
    top = np.argpartition(table_s, width - k, axis=1)[:, width - k :]
    best_s[act] = np.take_along_axis(table_s, top, 1)
    best_r[act] = np.take_along_axis(table_r, top, 1)
    thr[act] = best_s[act].min(axis=1)


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
    out_s = np.empty((q, kk), np.float32)
    out_r = np.empty((q, kk), np.int64)
    if kk == 0:
        return out_s, out_r
    if q * n <= _DIRECT_ELEMENTS:  # small problem: one product, no blocking overhead
        if q * n * queries.shape[1] <= _SINGLE_THREAD_MACS:
            # one BLAS thread: handing off to the pool costs more than the product at
            # this size (and a whole time slice when other processes keep the cores
            # busy); single-threaded sgemv is 2x faster than einsum here
            with single_threaded_blas():
                scores = queries @ vectors.T
        else:
            scores = queries @ vectors.T
        qi = np.arange(q)[:, None]  # fancy indexing: take_along_axis costs ~9 us a call
        top = np.argpartition(scores, n - kk, axis=1)[:, n - kk :] if kk < n else None
        vals = scores if top is None else scores[qi, top]
        order = np.argsort(-vals, axis=1, kind="stable")
        out_s[:] = vals[qi, order]
        out_r[:] = order if top is None else top[qi, order]
        return out_s, out_r
    qb, width = _block_shape(q, n, kk, max_batch_bytes)
    length = width // _GROUPS
    # transposed score block (gallery rows x queries): the GEMM is as fast or faster
    # this way round, and the group maximum becomes 63 element-wise maxima of long
    # contiguous slabs instead of millions of short reductions
    buf = np.empty((width, qb), np.float32)
    member = np.arange(_GROUPS, dtype=np.int64) * length  # offsets of a group's members
    for q0 in range(0, q, qb):
        q1 = min(q, q0 + qb)
        m = q1 - q0
        qblock_t = queries[q0:q1].T
        best_s = np.full((m, kk), -np.inf, np.float32)
        best_r = np.full((m, kk), -1, np.int64)
        thr = np.full((m,), -np.inf, np.float32)
        scores = buf[:, :m]  # (width, m)
        for r0 in range(0, n, width):
            w = min(n, r0 + width) - r0
            np.matmul(vectors[r0 : r0 + w], qblock_t, out=scores[:w])
            if w < width:
                scores[w:] = -np.inf
            if length < 2 * kk:  # too few groups to prune: merge the whole block
                cc, rr = np.nonzero(scores[:w] >= thr[None, :])
                o = np.argsort(rr, kind="stable")
                _merge(best_s, best_r, thr, rr[o], scores[cc[o], rr[o]], cc[o] + r0)
                continue
            # (m, length): max over the g members {j, j + length, ...} of each group j
            gmax = np.ascontiguousarray(scores.reshape(_GROUPS, length, m).max(axis=0).T)
            # the kk largest group maxima are kk distinct scores: a lower bound on the k-th
            kth = np.partition(gmax, length - kk, axis=1)[:, length - kk]
            np.maximum(thr, kth, out=thr)
            gr, gj = np.nonzero(gmax >= thr[:, None])
            cols = gj[:, None] + member  # (c, g) block rows of each surviving group
            vals = scores[cols, gr[:, None]]
            keep = (vals >= thr[gr][:, None]) & (cols < w)
            rr = np.broadcast_to(gr[:, None], cols.shape)[keep]
            _merge(best_s, best_r, thr, rr, vals[keep], cols[keep] + r0)
        order = np.argsort(-best_s, axis=1, kind="stable")
        out_s[q0:q1] = np.take_along_axis(best_s, order, 1)
        out_r[q0:q1] = np.take_along_axis(best_r, order, 1)
    return out_s, out_r


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
        arr = np.load(path, allow_pickle=False)
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
        if isinstance(max_batch_bytes, bool) or int(max_batch_bytes) < 4 * _MIN_BLOCK_ROWS:
            raise InputError(f"max_batch_bytes must be >= {4 * _MIN_BLOCK_ROWS}")
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
