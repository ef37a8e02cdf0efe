"""FAISS-backed index built from a factory string (inner-product metric).

``FaissIndex("HNSW32", dim)``, ``FaissIndex("IVF1024,Flat", dim, nprobe=16)``,
``FaissIndex("OPQ16,IVF1024,PQ16", dim, nprobe=32, rescore=4)``.

Keys and labels: FAISS sees *labels*, int64 numbers galleria hands out in
increasing order and never reuses; ``label_key_`` maps a label to its key (or
``-1`` once removed). Replacing a key (remove, then add) therefore never
confuses an old vector with the new one, even in indexes that cannot delete.

Removal, by index family:

* IVF (``IVF...``, also behind ``OPQ``/``PCA`` pre-transforms): labels are
  stored in the inverted lists natively; ``remove_ids`` deletes them.
* flat-code indexes (``Flat``, ``PQ16``, ``SQ8`` ...): wrapped in
  ``IndexIDMap2``, whose ``remove_ids`` works.
* indexes that cannot delete (``HNSW32`` and anything ``remove_ids`` rejects):
  used without an id map (rows are added in label order, so row == label);
  removed labels become tombstones, filtered out during search with a FAISS
  ``IDSelector`` (or by over-fetching where no selector can be passed); the
  index is rebuilt from the live vectors when tombstones exceed
  ``rebuild_fraction`` of it.

``rescore=r`` fetches ``k * r`` candidates and re-scores them exactly against
the raw float32 vectors, which the index then keeps beside FAISS (as it also
does when a non-deleting index stores lossy codes, so that a rebuild is
lossless). Indexes that need training are trained on the vectors of the first
:meth:`~FaissIndex.add` unless :meth:`~FaissIndex.train` was called.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import FormatError, InputError, MissingDependencyError
from galleria.index.base import Index, as_keys, check_k, pad_result
from galleria.index.exact import VectorTable, _read_npy, _write_npy
from galleria.io.atomic import atomic_open
from galleria.types import SearchResult

log = logging.getLogger(__name__)

DEFAULT_REBUILD_FRACTION = 0.25
_RESCORE_BLOCK_BYTES = 64 << 20


def _faiss() -> Any:
    try:
        import faiss  # lazy: faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise MissingDependencyError("FaissIndex needs faiss-cpu (pip install faiss-cpu)") from exc
    return faiss


def _is_ivf(index: Any) -> bool:
    """True for an IVF index, also behind pre-transforms (labels stored natively)."""
    faiss = _faiss()
    idx = faiss.downcast_index(index)
    while isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return isinstance(idx, faiss.IndexIVF)


def _min_train_points(index: Any) -> tuple[int, str]:
    """``(n, why)``: fewest training vectors the index accepts, with the reason."""
    faiss = _faiss()
    need, why = 1, "training"
    stack = [faiss.downcast_index(index)]
    while stack:
        idx = stack.pop()
        if isinstance(idx, faiss.IndexPreTransform):
            stack.append(faiss.downcast_index(idx.index))
            for i in range(idx.chain.size()):
                vt = faiss.downcast_VectorTransform(idx.chain.at(i))
                if isinstance(vt, faiss.OPQMatrix) and need < 256:
                    need, why = 256, "OPQ trains a 256-centroid product quantizer"
        elif isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            stack.append(faiss.downcast_index(idx.index))
        if isinstance(idx, faiss.IndexIVF) and idx.nlist > need:
            need, why = int(idx.nlist), f"{idx.nlist} inverted lists (one centroid each)"
        pq = getattr(idx, "pq", None)
        if pq is not None and int(pq.ksub) > need:
            need, why = int(pq.ksub), f"PQ with {pq.nbits}-bit codes ({pq.ksub} centroids)"
    return need, why


class FaissIndex(Index):
    """Inner-product FAISS index over int64 keys.

    Args:
        spec: FAISS factory string without an ``IDMap`` prefix, e.g. ``"Flat"``,
            ``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF1024,PQ16"``, ``"OPQ16,IVF1024,PQ16"``.
        dim: vector dimension D.
        fingerprint: model fingerprint of the vectors (checked on load).
        nprobe: inverted lists visited per query (IVF indexes).
        ef_search: HNSW search beam width (HNSW, or an IVF's HNSW quantizer).
        rescore: if > 0, re-score ``k * rescore`` FAISS candidates exactly.
        rebuild_fraction: rebuild a non-deleting index when tombstones exceed
            this fraction of its vectors.
    """

    type_name = "faiss"
    format_version = 1

    def __init__(
        self,
        spec: str,
        dim: int,
        *,
        fingerprint: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rescore: int = 0,
        rebuild_fraction: float = DEFAULT_REBUILD_FRACTION,
    ) -> None:
        super().__init__(dim, fingerprint=fingerprint)
        if not isinstance(spec, str) or not spec.strip():
            raise InputError(f"spec must be a FAISS factory string; got {spec!r}")
        if re.match(r"\s*IDMap", spec):
            raise InputError(f"spec {spec!r}: leave out 'IDMap', galleria maps keys itself")
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or int(value) <= 0):
                raise InputError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(rescore, bool) or int(rescore) < 0:
            raise InputError(f"rescore must be an integer >= 0; got {rescore!r}")
        if not 0.0 < float(rebuild_fraction) <= 1.0:
            raise InputError(f"rebuild_fraction must be in (0, 1]; got {rebuild_fraction!r}")
        self.spec = spec.strip()
        self.nprobe = None if nprobe is None else int(nprobe)
        self.ef_search = None if ef_search is None else int(ef_search)
        self.rescore = int(rescore)
        self.rebuild_fraction = float(rebuild_fraction)
        self.index_ = self._new_index()
        self._configure()
        #: label -> key (-1 for a removed label), and key -> live label.
        self.label_key_ = np.empty((0,), np.int64)
        self._key_label: dict[int, int] = {}
        self._next_label = 0
        self._tombstones: set[int] = set()
        self._selector_refs: tuple[Any, ...] | None = None
        self._selector_lock = threading.Lock()  # concurrent searches build it once
        self._table: VectorTable | None = VectorTable(self.dim) if self._keeps_vectors() else None

    # -- construction -----------------------------------------------------------------

    def _new_index(self) -> Any:
        faiss = _faiss()
        try:
            index = faiss.index_factory(self.dim, self.spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[-1]
            raise InputError(f"invalid FAISS factory string {self.spec!r}: {msg}") from exc
        if _is_ivf(index):
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            # hash table label -> list entry: removal without scanning every list
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            if hasattr(ivf, "do_polysemous_training"):
                # FAISS turns it on for 8-bit IVFPQ; it only serves polysemous_ht
                # filtering, which galleria never sets, and costs seconds of training
                ivf.do_polysemous_training = False
            self.removable_ = True
            return index
        try:
            index.remove_ids(faiss.IDSelectorBatch(np.empty((0,), np.int64)))
        except RuntimeError:
            # cannot delete (HNSW ...): rows are numbered in add order, which is
            # label order, so no id map is needed (IndexIDMap2 would also slow
            # single-query HNSW search down by orders of magnitude in FAISS 1.15)
            self.removable_ = False
            return index
        # deletes by shifting rows (flat codes): IndexIDMap2 keeps label <-> row
        self.removable_ = True
        del index
        return faiss.index_factory(self.dim, "IDMap2," + self.spec, faiss.METRIC_INNER_PRODUCT)

    def _inner(self) -> Any:
        """The index under the IDMap2 wrapper (or the index itself)."""
        faiss = _faiss()
        idx = faiss.downcast_index(self.index_)
        if isinstance(idx, (faiss.IndexIDMap2, faiss.IndexIDMap)):
            idx = faiss.downcast_index(idx.index)
        return idx

    def _keeps_vectors(self) -> bool:
        if self.rescore > 0:
            return True
        if self.removable_:
            return False
        # a rebuild reconstructs from FAISS; only flat storage reconstructs exactly
        faiss = _faiss()
        inner = self._inner()
        return not isinstance(inner, (faiss.IndexHNSWFlat, faiss.IndexFlat))

    def _configure(self) -> None:
        faiss = _faiss()
        self._selector_refs = None
        space = faiss.ParameterSpace()
        for name, value, faiss_names in (
            ("nprobe", self.nprobe, ("nprobe",)),
            ("ef_search", self.ef_search, ("efSearch", "quantizer_efSearch")),
        ):
            if value is None:
                continue
            for fname in faiss_names:
                try:
                    space.set_index_parameter(self.index_, fname, value)
                    break
                except RuntimeError:
                    continue
            else:
                raise InputError(f"{name} does not apply to FAISS index {self.spec!r}")

    def params(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "rescore": self.rescore,
            "rebuild_fraction": self.rebuild_fraction,
        }

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change ``nprobe`` / ``ef_search`` in place (no rebuild)."""
        old = (self.nprobe, self.ef_search)
        if nprobe is not None:
            self.nprobe = int(nprobe)
        if ef_search is not None:
            self.ef_search = int(ef_search)
        try:
            if any(v is not None and (isinstance(v, bool) or v <= 0) for v in (nprobe, ef_search)):
                raise InputError("nprobe and ef_search must be positive integers")
            self._configure()
        except InputError:
            self.nprobe, self.ef_search = old
            raise

    # -- sizes and keys ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._key_label)

    def keys(self) -> np.ndarray:
        lk = self.label_key_[: self._next_label]
        return lk[lk >= 0].copy()

    @property
    def is_trained(self) -> bool:
        return bool(self.index_.is_trained)

    @property
    def tombstones(self) -> int:
        """Removed vectors still inside a non-deleting FAISS index."""
        return len(self._tombstones)

    # -- training and updates ---------------------------------------------------------

    def train(self, vectors: np.ndarray) -> FaissIndex:
        """Train on ``(N, D)`` vectors (IVF centroids, PQ/OPQ codebooks); returns self."""
        x = self._vectors(vectors)
        if self.index_.ntotal > 0:
            raise InputError("train() on an index that already holds vectors; create a new one")
        self._train(x)
        return self

    def _train(self, x: np.ndarray) -> None:
        need, why = _min_train_points(self.index_)
        if x.shape[0] < need:
            raise InputError(
                f"FAISS index {self.spec!r} needs at least {need} training vectors "
                f"({why}); got {x.shape[0]}. Train on more vectors (train(x)) or use "
                "fewer lists / smaller codes"
            )
        try:
            self.index_.train(x)
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[-1]
            raise InputError(f"training FAISS index {self.spec!r} failed: {msg}") from exc
        log.debug("trained %s on %d vectors", self.spec, x.shape[0])

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        x = self._vectors(vectors)
        k = as_keys(keys, n=x.shape[0])
        known = self._key_label
        present = [key for key in k.tolist() if key in known]
        if present:
            raise InputError(
                f"{len(present)} key(s) already in the index, e.g. {present[:5]}; "
                "remove them first to replace their vectors"
            )
        if not self.index_.is_trained:
            self._train(x)
        labels = np.arange(self._next_label, self._next_label + k.size, dtype=np.int64)
        if self.removable_:
            self.index_.add_with_ids(x, labels)
        else:  # rows are numbered in add order: row == label
            if int(self.index_.ntotal) != self._next_label:
                raise RuntimeError("FAISS row numbers out of step with galleria labels")
            self.index_.add(x)
        self._grow_labels(labels, k)
        if self._table is not None:
            self._table.add(labels, x)

    def _grow_labels(self, labels: np.ndarray, keys: np.ndarray) -> None:
        end = int(labels[-1]) + 1
        if end > self.label_key_.shape[0]:
            grown = np.full((max(end, int(self.label_key_.shape[0] * 1.5) + 16),), -1, np.int64)
            grown[: self._next_label] = self.label_key_[: self._next_label]
            self.label_key_ = grown
        self.label_key_[labels] = keys
        self._key_label.update(zip(keys.tolist(), labels.tolist(), strict=True))
        self._next_label = end

    def remove(self, keys: np.ndarray) -> int:
        k = as_keys(keys, unique=False)
        labels = [self._key_label.pop(key) for key in set(k.tolist()) if key in self._key_label]
        if not labels:
            return 0
        lab = np.asarray(labels, np.int64)
        self.label_key_[lab] = -1
        if self._table is not None:
            self._table.remove(lab)
        if self.removable_:
            faiss = _faiss()
            sel = faiss.IDSelectorArray(lab) if _is_ivf(self.index_) else faiss.IDSelectorBatch(lab)
            self.index_.remove_ids(sel)
        else:
            self._tombstones.update(labels)
            self._selector_refs = None
            if len(self._tombstones) > self.rebuild_fraction * self.index_.ntotal:
                self.rebuild()
        return len(labels)

    def rebuild(self) -> None:
        """Rebuild the FAISS index from the live vectors (drops tombstones, renumbers labels)."""
        if self._table is not None:
            old_labels = self._table.keys.copy()
            x = self._table.vectors.copy()
        else:  # flat storage without an id map: row == label
            ntotal = int(self.index_.ntotal)
            live = self.label_key_[:ntotal] >= 0
            x = self.index_.reconstruct_n(0, ntotal)[live]
            old_labels = np.flatnonzero(live)
        keys = self.label_key_[old_labels]
        log.info("rebuilding %s: %d live vectors, %d tombstones", self.spec, keys.size,
                 len(self._tombstones))
        self.index_ = self._new_index()
        self._configure()
        self.label_key_ = np.empty((0,), np.int64)
        self._key_label = {}
        self._next_label = 0
        self._tombstones = set()
        self._selector_refs = None
        if self._table is not None:
            self._table = VectorTable(self.dim)
        if keys.size:
            self.add(keys, x)

    def copy(self) -> FaissIndex:
        """An independent deep copy (the FAISS index cloned, label maps copied)."""
        faiss = _faiss()
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        try:
            out.index_ = faiss.clone_index(self.index_)
        except RuntimeError:  # a type the cloner does not know: round trip through bytes
            out.index_ = faiss.deserialize_index(faiss.serialize_index(self.index_))
        out._configure()
        out.label_key_ = self.label_key_.copy()
        out._key_label = dict(self._key_label)
        out._tombstones = set(self._tombstones)
        out._selector_refs = None
        out._selector_lock = threading.Lock()
        out._table = None if self._table is None else self._table.copy()
        return out

    # -- search -----------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        k = check_k(k)
        q = self._queries(queries)
        if not self._key_label:
            return SearchResult.empty(q.shape[0], k)
        index = self.index_
        fetch = k * self.rescore if self.rescore else k
        ntotal = index.ntotal
        if fetch > ntotal:
            fetch = ntotal
        if self._tombstones:
            scores, labels = self._search_labels(q, fetch)
        else:
            scores, labels = index.search(q, fetch)
        if self.rescore:
            scores, labels = self._rescore(q, labels, min(k, fetch))
        # FAISS puts missing results (-1) last in each row: look at the last column only
        last = labels[:, -1]
        if (last[0] if last.shape[0] == 1 else last.min()) >= 0:  # every slot filled
            keys = self.label_key_[labels]
        else:
            missing = labels < 0
            keys = np.where(missing, -1, self.label_key_[np.where(missing, 0, labels)])
            scores = np.where(missing, np.float32(-np.inf), scores).astype(np.float32)
        if keys.shape[1] == k:
            return SearchResult(scores, keys)
        return pad_result(scores, keys, k)

    def _search_labels(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._tombstones:
            return self.index_.search(q, fetch)
        params = self._filter_params()
        if params is not None:
            return self.index_.search(q, fetch, params=params)
        # no selector support: over-fetch and drop tombstones
        n = int(self.index_.ntotal)
        want = min(n, fetch + len(self._tombstones)) if len(self._tombstones) < 4 * fetch else 0
        want = max(want, min(n, 2 * fetch))
        dead = np.fromiter(self._tombstones, np.int64, len(self._tombstones))
        while True:
            d, i = self.index_.search(q, want)
            alive = (i >= 0) & ~np.isin(i, dead)
            if alive.sum(axis=1).min() >= fetch or want >= n:
                break
            want = min(n, 2 * want)
        order = np.argsort(~alive, axis=1, kind="stable")[:, :fetch]
        d = np.take_along_axis(np.where(alive, d, -np.inf), order, 1)
        i = np.take_along_axis(np.where(alive, i, -1), order, 1)
        return d.astype(np.float32), i

    def _filter_params(self) -> Any:
        """SearchParameters excluding tombstoned labels, or None if the index takes none.

        Built once per set of tombstones and kept (with the C++ objects it points to)
        until the next removal; searches running in parallel share it read-only.
        """
        refs = self._selector_refs
        if refs is not None:
            return refs[0]
        with self._selector_lock:
            if self._selector_refs is None:
                self._selector_refs = self._build_filter()
            return self._selector_refs[0]

    def _build_filter(self) -> tuple[Any, ...]:
        faiss = _faiss()
        inner = faiss.downcast_index(self.index_)
        if not isinstance(inner, faiss.IndexHNSW):
            return (None,)
        dead = np.fromiter(self._tombstones, np.int64, len(self._tombstones))
        batch = faiss.IDSelectorBatch(dead)
        sel = faiss.IDSelectorNot(batch)
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(inner.hnsw.efSearch)
        params.sel = sel
        return (params, sel, batch)  # keep the C++ objects alive

    def _rescore(
        self, q: np.ndarray, labels: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._table is not None
        rows = self._table.rows_of(labels)
        nq, fetch = labels.shape
        out_s = np.empty((nq, k), np.float32)
        out_l = np.empty((nq, k), np.int64)
        step = max(1, _RESCORE_BLOCK_BYTES // max(1, fetch * self.dim * 4))
        table = self._table.vectors
        for q0 in range(0, nq, step):
            q1 = min(nq, q0 + step)
            r = rows[q0:q1]
            v = table[np.maximum(r, 0)]  # (m, fetch, D)
            s = np.einsum("md,mfd->mf", q[q0:q1], v, optimize=False)
            s[r < 0] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            out_s[q0:q1] = np.take_along_axis(s, top, 1)
            out_l[q0:q1] = np.where(
                np.take_along_axis(r, top, 1) >= 0, np.take_along_axis(labels[q0:q1], top, 1), -1
            )
        return out_s, out_l

    # -- persistence ------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        faiss = _faiss()

        def write_index(p: Path) -> None:
            with atomic_open(p, "wb") as fh:  # same bytes as faiss.serialize_index, streamed
                faiss.write_index(self.index_, faiss.PyCallbackIOWriter(fh.write))

        writers = {
            "index": (".faiss", write_index),
            "labels": (".npy", _write_npy(self.label_key_[: self._next_label])),
            "tombstones": (
                ".npy",
                _write_npy(np.asarray(sorted(self._tombstones), dtype=np.int64)),
            ),
        }
        if self._table is not None:
            writers["vectors"] = (".npy", _write_npy(self._table.vectors))
            writers["vector_labels"] = (".npy", _write_npy(self._table.keys))
        self._commit(path, writers, faiss_version=faiss.__version__)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        dim: int | None = None,
    ) -> FaissIndex:
        faiss = _faiss()
        header = cls._load_header(path, fingerprint=fingerprint, dim=dim)
        p = Path(path)
        files = header.get("files", {})
        for role in ("index", "labels", "tombstones"):
            if role not in files:
                raise FormatError(f"{p}/header.json names no {role!r} file")
        params = dict(header["params"])
        try:
            spec = params.pop("spec")
            index = cls(spec, int(header["dim"]), fingerprint=header.get("fingerprint"), **params)
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{p}/header.json has malformed params: {exc}") from exc
        try:
            raw = faiss.read_index(str(p / files["index"]))
        except RuntimeError as exc:
            raise FormatError(f"{p / files['index']} is not a readable FAISS index") from exc
        if raw.d != index.dim:
            raise FormatError(f"{p}: FAISS index has dimension {raw.d}, header says {index.dim}")
        index.index_ = raw  # read_index returns the downcast, owning object
        index._configure()
        label_key = _read_npy(p / files["labels"], dtype=np.int64, ndim=1)
        tomb = _read_npy(p / files["tombstones"], dtype=np.int64, ndim=1)
        index.label_key_ = label_key.copy()
        index._next_label = int(label_key.size)
        live = np.flatnonzero(label_key >= 0)
        index._key_label = dict(zip(label_key[live].tolist(), live.tolist(), strict=True))
        index._tombstones = set(tomb.tolist())
        if index._table is not None:
            if "vectors" not in files or "vector_labels" not in files:
                raise FormatError(f"{p}: rescoring index saved without its raw vectors")
            vecs = _read_npy(p / files["vectors"], dtype=np.float32, ndim=2)
            vlab = _read_npy(p / files["vector_labels"], dtype=np.int64, ndim=1)
            index._table.adopt(vlab, vecs)
        index.generation = int(header.get("generation", 0))
        if len(index) != int(header["ntotal"]) or int(raw.ntotal) != len(index) + len(tomb):
            raise FormatError(
                f"{p}: {len(index)} live keys and {raw.ntotal} FAISS vectors do not match "
                f"the header (ntotal={header['ntotal']}, tombstones={tomb.size})"
            )
        return index
