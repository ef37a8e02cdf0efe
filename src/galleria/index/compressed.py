"""Exact search over a compressed copy: ``exact-bf16`` and ``exact-int8``.

The scored copy is held compressed (bf16: 2 bytes per dimension; int8 with one
scale per vector: 1 byte) and scanned by a GEMM (torch: oneDNN bf16, VNNI
int8); a short list per query is re-scored exactly in float32 against the full
vectors, which live outside RAM (a :class:`~galleria.index.vectors.VectorSource`
attached by the gallery store, or a memory-mapped file the index owns). Results
equal :class:`~galleria.index.exact.ExactIndex`: same top-k keys, float32
scores (to float rounding), ties broken by key.

Why exact: each codec bounds the error of every approximate score,
``|q.x - s_hat(q, x)| <= eps(q, x)`` (see :mod:`galleria.index.codecs`); the
index adds the float32 rounding of the re-scored products themselves
(``gamma_D ||q|| max ||x||``), so "exact" means: the float32 result of exact
search, ties between equal float32 scores broken by key.

1. Scan (one pass, :func:`~galleria.index.topk.scan_window`): per query keep
   every vector whose ``s_hat`` is within ``2 eps_max(q)`` of the final k-th
   best ``s_hat`` (``eps_max`` = the bound with the gallery's largest residual
   and code norms). The short list is therefore as long as the data needs: no
   shortlist constant to tune.
2. Re-score exactly, in two steps: the k best by ``s_hat`` first, which gives a
   lower bound ``t`` on the true k-th best score; then every other candidate
   with ``s_hat + eps >= t`` (per-vector ``eps``). The k-th best exact score
   among them is ``t_k``.
3. Proof of completeness: a vector left out has ``s_hat <= floor`` (the
   window floor ``s_hat_k - 2 eps_max``), so its exact score is at most
   ``floor + eps_max = s_hat_k - eps_max <= t_k``, with ``<`` guaranteed by a
   relative margin: it cannot enter the top k. The index checks this per
   query; it fails only when the memory cap on candidates was hit (e.g.
   thousands of equal vectors), and such a query is answered by an exact
   float32 scan over the vectors.

Small galleries with an owned float32 file (``N * D <= 2^22``) are searched
directly on the mapped float32 rows with the exact kernel: at that size the
fixed cost of the compressed path (~100 us) would dominate, and the rows fit
in cache.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.index.base import Index, as_keys, check_k, pad_result
from galleria.index.codecs import CODECS, Codec
from galleria.index.exact import DEFAULT_MAX_BATCH_BYTES, _read_npy, _write_npy, inner_product_topk
from galleria.index.topk import MIN_BLOCK_ROWS, scan_window
from galleria.index.vectors import MappedRows, VectorSource
from galleria.types import SearchResult

log = logging.getLogger(__name__)

#: Owned float32 rows up to this many values are searched with the exact kernel.
_SMALL_VALUES = 1 << 22
#: Vectors are encoded in chunks of this many bytes of float64 temporaries.
_ENCODE_BYTES = 32 << 20
#: Re-scoring works through this many bytes of gathered vectors at a time.
_RESCORE_BYTES = 8 << 20


_VECDOT = getattr(np, "vecdot", None)


def _dot_rows(rows: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``rows @ v`` in the calling thread (numpy < 2: einsum)."""
    return _VECDOT(rows, v) if _VECDOT is not None else np.einsum("nd,d->n", rows, v)


class NoVectorSourceError(InputError):
    """A compressed index saved without its float32 vectors needs ``attach_source``."""


class _Table:
    """Codes, keys and (optionally) owned float32 rows, with swap-remove."""

    def __init__(self, codec: Codec, own: MappedRows | None) -> None:
        d = codec.dim
        self.codes = np.empty((0, d), codec.code_dtype)
        self.keys_ = np.empty((0,), np.int64)
        self.rows: dict[int, int] = {}
        self.n = 0
        self.own = own

    def add(self, keys: np.ndarray, codes: np.ndarray, x: np.ndarray) -> None:
        need = self.n + keys.size
        if need > self.codes.shape[0]:
            cap = need if self.n == 0 else max(need, int(self.codes.shape[0] * 1.5) + 16)
            for name in ("codes", "keys_"):
                old = getattr(self, name)
                grown = np.empty((cap, *old.shape[1:]), old.dtype)
                grown[: self.n] = old[: self.n]
                setattr(self, name, grown)
        self.codes[self.n : need] = codes
        self.keys_[self.n : need] = keys
        if self.own is not None:
            self.own.append(x)
        self.rows.update(zip(keys.tolist(), range(self.n, need), strict=True))
        self.n = need

    def remove(self, keys: np.ndarray) -> int:
        get = self.rows.get
        rows = np.fromiter((get(k, -1) for k in np.unique(keys).tolist()), np.int64)
        rows = rows[rows >= 0]
        if rows.size == 0:
            return 0
        n_after = self.n - rows.size
        dead = np.zeros(rows.size, dtype=bool)  # over the tail [n_after, n)
        dead[rows[rows >= n_after] - n_after] = True
        holes = np.sort(rows[rows < n_after])
        movers = n_after + np.flatnonzero(~dead)
        for key in self.keys_[rows].tolist():
            del self.rows[key]
        if holes.size:
            for arr in (self.codes, self.keys_):
                arr[holes] = arr[movers]
            self.rows.update(zip(self.keys_[holes].tolist(), holes.tolist(), strict=True))
        if self.own is not None:
            self.own.move(holes, movers, n_after)
        self.n = n_after
        return int(rows.size)

    def copy(self) -> _Table:
        t = _Table.__new__(_Table)
        t.codes, t.keys_ = self.codes[: self.n].copy(), self.keys_[: self.n].copy()
        t.rows, t.n = dict(self.rows), self.n
        t.own = None if self.own is None else self.own.copy()
        return t


class CompressedIndex(Index):
    """Exact inner-product index over compressed codes with exact float32 re-scoring.

    Args:
        dim: vector dimension D.
        fingerprint: model fingerprint of the vectors (checked on load).
        max_batch_bytes: upper bound on one score block.
        source: full-precision vectors by key (the gallery store's); without it the
            index keeps its own float32 rows in a memory-mapped scratch file.
        scratch_dir: folder for that scratch file (default: the system temp folder).
    """

    type_name: ClassVar[str]
    codec_name: ClassVar[str]
    format_version = 1

    def __init__(
        self,
        dim: int,
        *,
        fingerprint: str | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        source: VectorSource | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(dim, fingerprint=fingerprint)
        if isinstance(max_batch_bytes, bool) or int(max_batch_bytes) < 4 * MIN_BLOCK_ROWS:
            raise InputError(f"max_batch_bytes must be >= {4 * MIN_BLOCK_ROWS}")
        self.max_batch_bytes = int(max_batch_bytes)
        self.scratch_dir = None if scratch_dir is None else os.fspath(scratch_dir)
        self.codec = CODECS[self.codec_name](self.dim)
        self._source: VectorSource | None = None
        self._detached = False  # loaded without its vectors and no source attached yet
        own = None if source is not None else MappedRows(self.dim, scratch_dir=self.scratch_dir)
        self._table = _Table(self.codec, own)
        if source is not None:
            self.attach_source(source)
        # largest rnorm / cnorm in the table: an upper bound (kept through removals)
        self._rmax = 0.0
        self._cmax = 0.0
        self._xmax = 0.0

    @property
    def spec(self) -> str:
        return self.type_name

    def params(self) -> dict[str, Any]:
        return {"max_batch_bytes": self.max_batch_bytes}

    def __len__(self) -> int:
        return self._table.n

    def keys(self) -> np.ndarray:
        return self._table.keys_[: self._table.n].copy()

    @property
    def scored_bytes(self) -> int:
        """Bytes of the scored (compressed) copy: the codes (nothing else per vector)."""
        t = self._table
        return int(t.codes[: t.n].nbytes)

    @property
    def has_own_vectors(self) -> bool:
        return self._table.own is not None

    @property
    def source(self) -> VectorSource | None:
        """The attached vector source (``None`` with own vectors or none attached)."""
        return self._source

    @property
    def needs_source(self) -> bool:
        """Loaded without its float32 vectors and no source attached yet."""
        return self._detached

    # -- vector source ----------------------------------------------------------------

    def attach_source(self, source: VectorSource) -> None:
        """Re-score against ``source`` from now on (drops the index's own float32 file).

        ``source`` must return the vector of every key in the index (and of every
        key added later) exactly as given to :meth:`add`.
        """
        if not callable(getattr(source, "get", None)):
            raise InputError("a vector source needs a get(keys) -> (n, D) float32 method")
        if int(getattr(source, "dim", self.dim)) != self.dim:
            raise InputError(f"vector source has dim {source.dim}, index has {self.dim}")
        self._source = source
        self._table.own = None
        self._detached = False

    def detach_source(self) -> None:
        """Forget the attached source (search then needs a new one)."""
        self._source = None
        self._detached = self._table.own is None

    # -- updates ----------------------------------------------------------------------

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        x = self._vectors(vectors)
        k = as_keys(keys, n=x.shape[0])
        rows = self._table.rows
        present = [key for key in k.tolist() if key in rows] if self._table.n else []
        if present:
            raise InputError(
                f"{len(present)} key(s) already in the index, e.g. {present[:5]}; "
                "remove them first to replace their vectors"
            )
        if self.codec.needs_fit:  # int8 ranges: from the first vectors added
            self.codec.fit(x)
        step = max(256, _ENCODE_BYTES // (8 * self.dim))  # bounded float64 temporaries
        for c0 in range(0, k.size, step):
            c1 = min(k.size, c0 + step)
            codes, rnorm, cnorm = self.codec.encode(np.ascontiguousarray(x[c0:c1]))
            self._table.add(k[c0:c1], codes, x[c0:c1])
            # the bound uses the largest residual / code norm ever added (still valid
            # after removals; exact again after a rebuild)
            self._rmax = max(self._rmax, float(rnorm.max()))
            self._cmax = max(self._cmax, float(cnorm.max()))
            xc = x[c0:c1].astype(np.float64)
            self._xmax = max(self._xmax, float(np.sqrt(np.einsum("nd,nd->n", xc, xc).max())))

    def remove(self, keys: np.ndarray) -> int:
        return self._table.remove(as_keys(keys, unique=False))

    def copy(self) -> CompressedIndex:
        """An independent deep copy (codes and an owned float32 file copied; a source shared)."""
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.codec = copy.deepcopy(self.codec)
        out._table = self._table.copy()
        return out

    # -- search -----------------------------------------------------------------------

    def _fetch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors, pos)``: float32 vectors of the table rows ``rows`` (sorted, unique);
        the vector of ``rows[j]`` is ``vectors[pos[j]]``."""
        if self._table.own is not None:
            return self._table.own.take(rows), np.arange(rows.size)
        if self._source is None:
            raise NoVectorSourceError(
                f"this {self.type_name} index was saved without its float32 vectors: "
                "attach the gallery's vectors with attach_source(source)"
            )
        keys = self._table.keys_[rows]
        order = np.argsort(keys, kind="stable")
        pos = np.empty_like(order)
        pos[order] = np.arange(order.size)
        return np.asarray(self._source.get(keys[order]), dtype=np.float32), pos

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        k = check_k(k)
        q = self._queries(queries)
        t = self._table
        n = t.n
        if n == 0:
            return SearchResult.empty(q.shape[0], k)
        if self._detached:
            self._fetch(np.zeros(1, np.int64))  # raises the clear error
        if t.own is not None and n * self.dim <= _SMALL_VALUES:
            s, r = inner_product_topk(q, t.own.rows, k, max_batch_bytes=self.max_batch_bytes)
            return pad_result(s, t.keys_[r], k)
        kk = min(k, n)
        scores, rows = self._search_rows(q, kk)
        return pad_result(scores, t.keys_[rows], k)

    def _search_rows(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        t, codec = self._table, self.codec
        n, nq = t.n, q.shape[0]
        qc = codec.queries(q)
        # eps_max(q): the bound for any vector (largest rnorm and cnorm, largest |z|),
        # plus the float32 error of the re-scored exact products (gamma_D ||q|| ||x||)
        qn = np.linalg.norm(q.astype(np.float64), axis=1)
        e0 = self.codec.gamma * qn * self._xmax + 1e-12
        eps_max = qc.e_x * self._rmax + qc.e_c * self._cmax + qc.e_z * qc.zmax * self._cmax + e0
        g = codec.gallery_tensor(t.codes[:n])

        def prepare(q0: int, q1: int):
            sub = qc.codes[q0:q1]

            def fill(r0: int, w: int, out: np.ndarray) -> None:
                codec.fill(g, sub, r0, w, out)

            return fill

        # window 2 eps_max (z units): holds every vector whose s_hat + eps can reach s_k
        slack = 2.0 * eps_max / qc.a * (1 + 1e-6)
        qi, z, rows, floor = scan_window(prepare, n, nq, kk, slack, dtype=codec.score_dtype,
                                         max_batch_bytes=self.max_batch_bytes)
        if log.isEnabledFor(logging.DEBUG):
            c = np.bincount(qi, minlength=nq)
            log.debug("candidates per query: median %d, p90 %d, max %d; eps_max mean %.4g",
                      np.median(c), np.percentile(c, 90), c.max(), eps_max.mean())
        best_s, best_r, tk = self._rescore(q, qc, qi, z, rows, kk, e0)
        # proof of completeness: a vector left out has z <= floor, so q.x <= bound
        bound = qc.a * floor + qc.b + eps_max
        again = np.flatnonzero(~((bound < tk) | np.isneginf(floor)))
        if again.size:  # only when the candidate cap was hit (pathological ties)
            log.info("%d of %d queries exceeded the candidate cap: exact float32 scan",
                     again.size, nq)
            best_s[again], best_r[again] = self._brute(q[again], kk)
        return best_s, best_r

    def _brute(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-kk over every float32 vector, fetched block by block (the fallback).

        Ties at the k-th place are resolved by key, as on the normal path.
        """
        t = self._table
        step = max(1024, _RESCORE_BYTES // (4 * self.dim))
        best_s = np.full((q.shape[0], kk), -np.inf, np.float32)
        best_r = np.full((q.shape[0], kk), -1, np.int64)
        for r0 in range(0, t.n, step):
            r1 = min(t.n, r0 + step)
            v, pos = self._fetch(np.arange(r0, r1))
            s = q @ v[pos].T
            cs = np.concatenate([best_s, s], 1)
            cr = np.concatenate([best_r, np.broadcast_to(np.arange(r0, r1), s.shape)], 1)
            keys = np.where(cr >= 0, t.keys_[np.maximum(cr, 0)], np.iinfo(np.int64).max)
            o = np.lexsort((keys, -cs.astype(np.float64)), axis=1)[:, :kk]
            best_s, best_r = np.take_along_axis(cs, o, 1), np.take_along_axis(cr, o, 1)
        return best_s, best_r

    def _rescore(self, q, qc, qi, z, rows, kk, e0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact top-kk of flat candidates (sorted by query, then z best first).

        Returns ``(scores (Q, kk), rows (Q, kk), t_k (Q,))``, ``t_k`` = k-th best exact score.
        """
        nq = q.shape[0]
        zf = z.astype(np.float64)
        shat = qc.a[qi] * zf + qc.b[qi]
        eps = (qc.e_x[qi] * self._rmax + qc.e_c[qi] * self._cmax
               + qc.e_z[qi] * np.abs(zf) + e0[qi])
        counts = np.bincount(qi, minlength=nq)
        start = np.cumsum(counts) - counts
        rank = np.arange(qi.size) - start[qi]
        exact = np.full(qi.size, -np.inf, np.float32)
        first = np.flatnonzero(rank < kk)  # the kk best s_hat of each query
        exact[first] = self._exact_scores(q, qi[first], rows[first])
        # t: k-th best exact among those kk, a lower bound on the true k-th best score
        t = np.full(nq, np.inf)
        np.minimum.at(t, qi[first], exact[first].astype(np.float64))
        t[counts < kk] = -np.inf
        need = np.flatnonzero((rank >= kk) & (shat + eps >= t[qi]))
        exact[need] = self._exact_scores(q, qi[need], rows[need])
        done = np.isfinite(exact)
        qd, ed, rd = qi[done], exact[done], rows[done]
        kd = self._table.keys_[rd]
        o = np.lexsort((kd, -ed.astype(np.float64), qd))
        qd, ed, rd = qd[o], ed[o], rd[o]
        cnt = np.bincount(qd, minlength=nq)
        rk = np.arange(qd.size) - (np.cumsum(cnt) - cnt)[qd]
        sel = rk < kk
        best_s = np.full((nq, kk), -np.inf, np.float32)
        best_r = np.full((nq, kk), -1, np.int64)
        best_s[qd[sel], rk[sel]] = ed[sel]
        best_r[qd[sel], rk[sel]] = rd[sel]
        return best_s, best_r, best_s[:, kk - 1].astype(np.float64)

    def _exact_scores(self, q: np.ndarray, qi: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 ``q[qi] . x[rows]`` (``qi`` sorted), a few queries at a time.

        Each chunk of queries gathers its candidates' vectors once (at most
        ``_RESCORE_BYTES``: small buffers are reused, while one large gather paid a
        page fault per 4 KB of fresh memory, 1.7 s instead of 0.3 s for 143k x 1280)
        and scores them with one ``np.vecdot`` per query (single-threaded BLAS dots:
        0.05 s CPU for 1000 queries x ~65 candidates x 1280-d, against 0.44 s for an
        ``einsum`` over all pairs). A pair's score does not depend on its batch.
        """
        vals = np.empty(qi.size, np.float32)
        if qi.size == 0:
            return vals
        cut = np.flatnonzero(np.diff(qi)) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [qi.size]])
        per_chunk = max(1, _RESCORE_BYTES // (4 * self.dim))  # vectors gathered per chunk
        i = 0
        while i < starts.size:
            j = int(np.searchsorted(ends, starts[i] + per_chunk, side="right"))
            j = max(j, i + 1)
            a, b = int(starts[i]), int(ends[j - 1])
            uniq, inv = np.unique(rows[a:b], return_inverse=True)
            vecs, pos = self._fetch(uniq)
            inv = pos[inv]
            for s0, s1 in zip(starts[i:j].tolist(), ends[i:j].tolist(), strict=True):
                vals[s0:s1] = _dot_rows(vecs[inv[s0 - a : s1 - a]], q[qi[s0]])
            i = j
        return vals

    # -- persistence ------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        t = self._table
        writers = {
            "codes": (".npy", _write_npy(t.codes[: t.n])),
            "keys": (".npy", _write_npy(t.keys_[: t.n])),
        }
        if self.codec.state is not None:
            writers["codec"] = (".npy", _write_npy(self.codec.state))
        if t.own is not None:
            writers["vectors"] = (".npy", _write_npy(t.own.rows))
        self._commit(path, writers, codec=self.codec_name,
                     vectors="own" if t.own is not None else "source",
                     bound={"rnorm_max": self._rmax, "cnorm_max": self._cmax,
                            "xnorm_max": self._xmax})

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        dim: int | None = None,
        source: VectorSource | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> CompressedIndex:
        """Load a saved index; without saved vectors, pass ``source`` (or attach it later)."""
        header = cls._load_header(path, fingerprint=fingerprint, dim=dim)
        p = Path(path)
        files = header.get("files", {})
        if header.get("codec") != cls.codec_name or not {"codes", "keys"} <= set(files):
            raise FormatError(f"{p}/header.json: not a {cls.type_name} index (codec, files)")
        n, d = int(header["ntotal"]), int(header["dim"])
        params = header["params"]
        index = cls(d, fingerprint=header.get("fingerprint"),
                    max_batch_bytes=int(params.get("max_batch_bytes", DEFAULT_MAX_BATCH_BYTES)),
                    scratch_dir=scratch_dir)
        codes = _read_npy(p / files["codes"], dtype=index.codec.code_dtype, ndim=2)
        keys = _read_npy(p / files["keys"], dtype=np.int64, ndim=1)
        if codes.shape != (n, d) or keys.shape != (n,):
            raise FormatError(f"{p}: arrays {codes.shape} / {keys.shape} do not match the "
                              f"header (ntotal={n}, dim={d})")
        bound = header.get("bound")
        try:
            rmax, cmax = float(bound["rnorm_max"]), float(bound["cnorm_max"])
            xmax = float(bound["xnorm_max"])
        except (TypeError, KeyError, ValueError) as exc:
            raise FormatError(f"{p}/header.json: missing or malformed 'bound'") from exc
        if not (np.isfinite([rmax, cmax, xmax]).all() and min(rmax, cmax, xmax) >= 0):
            raise FormatError(f"{p}/header.json: damaged error bound {bound}")
        if "codec" in files:
            state = _read_npy(p / files["codec"], dtype=np.float32, ndim=2)
            try:
                index.codec.set_state(state)
            except ValueError as exc:
                raise FormatError(f"{p}: {exc}") from exc
        elif n and index.codec.state is None and cls.codec_name == "int8":
            raise FormatError(f"{p}: int8 codes saved without their scales")
        t = index._table
        t.codes, t.keys_, t.n = codes, as_keys(keys), n
        t.rows = dict(zip(t.keys_.tolist(), range(n), strict=True))
        index._rmax, index._cmax, index._xmax = rmax, cmax, xmax
        if "vectors" in files:
            t.own = MappedRows.open(p / files["vectors"], n=n, dim=d, scratch_dir=index.scratch_dir)
        else:
            t.own = None
            index._detached = True
        if source is not None:
            index.attach_source(source)
        index.generation = int(header.get("generation", 0))
        return index


class ExactBf16Index(CompressedIndex):
    """Exact search scored on bf16 codes (half the memory of float32)."""

    type_name = "exact-bf16"
    codec_name = "bf16"


class ExactInt8Index(CompressedIndex):
    """Exact search scored on int8 codes with one scale per vector (a quarter of float32)."""

    type_name = "exact-int8"
    codec_name = "int8"
