"""ASMK* on FAISS and numpy: aggregated, binarised residuals in an inverted file.

Each gallery image becomes, per visual word it uses, one binary code (the sign
bits of the sum of its descriptors' residuals to that word's centroid: ``d``
bits, 16 bytes for 128-d SIFT, 8 for 64-d XFeat) plus a 4-byte row number. A
query is aggregated the same way after multiple assignment (each descriptor
to its ``multiple_assignment`` nearest words, ASMK*); its score against an
image is ``sum_w sigma(u_w) / sqrt(n_q n_x)`` with ``sigma`` the selective
kernel of :mod:`galleria.local.kernels` and ``n`` the number of words of each
side (the self-similarity of a binarised image).

Why not the ``asmk`` package: its inverted file only appends (no removal),
is kept as per-word Python lists and persisted with pickle. Here the inverted
file is a few immutable CSR *segments* (entries sorted by word): ``add`` writes
a new segment and merges neighbours of similar size (log-structured, so adds
cost O(log N) amortised merges); ``remove`` marks rows dead and the next full
merge drops their entries. Segments are never modified in place, so
:meth:`AsmkIndex.copy` shares them and copies only the per-row tables.

The codebook (``codebook="auto"``, the default) is the generic one galleria ships
for the extractor the index's fingerprint names (:mod:`galleria.local.codebook`:
``sift-v1``, 16,384 words trained once on images no evaluation uses), so the index
is as good on 30 images as on 10,000; its fingerprint is recorded in the index's
params and checked on load. Without a shipped codebook (another extractor, no
fingerprint, an explicit ``codebook_size`` or ``codebook="gallery"``) it is FAISS
k-means on a seeded sample of the training descriptors (``codebook_size="auto"``:
a power of two near ``descriptors / 40``, between 256 and 16,384). Assignment uses
an exact flat quantizer up to 4,096 words and an HNSW graph beyond
(``quantizer="auto"``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.index.base import as_keys
from galleria.local.base import LocalIndex, Rows
from galleria.local.codebook import (
    Codebook,
    check_recorded,
    codebook_by_name,
    descriptor_of,
    shipped_codebook,
)
from galleria.local.features import check_features, float_descriptors
from galleria.local.kernels import (
    aggregate_residuals,
    binarize,
    code_words,
    hamming_similarity,
    segment_gather,
    selective_kernel,
)
from galleria.local.persist import read_array, write_array
from galleria.local.segments import Segment as _Segment
from galleria.local.segments import build_segment as _segment
from galleria.local.segments import merge_segments as _merge
from galleria.types import LocalFeatures

log = logging.getLogger(__name__)

#: Query/entry pairs scored per numpy block (bounds the temporaries of one search).
_BLOCK_PAIRS = 1 << 20


def auto_codebook_size(n_descriptors: int) -> int:
    """Power of two nearest ``n / 40``, clipped to [256, 16384]."""
    target = max(1, n_descriptors) / 40.0
    return int(np.clip(2 ** round(np.log2(target)), 256, 16384))


def sample_descriptors(features: Sequence[LocalFeatures], n: int, *, seed: int) -> np.ndarray:
    """Up to ``n`` descriptors drawn uniformly (seeded) from all images -> float32 ``(m, d)``."""
    counts = np.array([len(f) for f in features], np.int64)
    total = int(counts.sum())
    if total == 0:
        raise InputError("no descriptors to train on (every image has 0 keypoints)")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
    offsets = np.r_[0, np.cumsum(counts)]
    img = np.searchsorted(offsets, pick, side="right") - 1
    parts = []
    for i in np.unique(img):
        local = pick[img == i] - offsets[i]
        parts.append(float_descriptors(features[i].descriptors[local]))
    return np.ascontiguousarray(np.concatenate(parts), np.float32)


#: Quantizers of shipped codebooks, built once per process and shared read-only by every
#: index using them (FAISS searches of an index nobody mutates are thread safe).
_QUANT_CACHE: dict[tuple[str, str], tuple[Any, int]] = {}
_QUANT_LOCK = threading.Lock()


def _quantizer(centroids: np.ndarray, kind: str) -> tuple[Any, int]:
    """A FAISS L2 quantizer over ``(W, d)`` centroids -> ``(index, serialized bytes)``."""
    import faiss  # heavy optional dependency (the index module imports without it)

    d = centroids.shape[1]
    if kind == "flat":
        q = faiss.IndexFlatL2(d)
    else:
        q = faiss.IndexHNSWFlat(d, 32)
        q.hnsw.efConstruction = 80
        q.hnsw.efSearch = 64
    q.add(np.ascontiguousarray(centroids, np.float32))
    return q, int(faiss.serialize_index(q).nbytes)


@dataclass(frozen=True)
class KMeansConfig:
    """Codebook training on the gallery: k-means iterations, training sample size per
    word, and the seed of the sample and of k-means."""

    iters: int = 10
    points_per_word: int = 32
    seed: int = 0


_KMEANS_KEYS = ("kmeans_iters", "points_per_word", "seed")


class AsmkIndex(LocalIndex):
    """ASMK* index (see the module docstring).

    Args:
        dim: descriptor dimension.
        fingerprint: local extractor fingerprint (checked on load).
        codebook_size: number of visual words, or ``"auto"`` (set when training).
        alpha, tau: selective kernel ``u^alpha`` for ``u > tau`` (ASMK*: 3, 0).
        multiple_assignment: words per query descriptor (ASMK*: 5); the gallery
            side uses one.
        quantizer: ``"flat"``, ``"hnsw"`` or ``"auto"``.
        kmeans: how a codebook is trained on the gallery (:class:`KMeansConfig`; the
            flat keywords ``kmeans_iters``, ``points_per_word`` and ``seed`` are
            accepted, and saved indexes record them flat).
        codebook: ``"auto"`` (the shipped codebook of the fingerprint's extractor
            when ``codebook_size`` is ``"auto"``, else trained on the gallery),
            ``"gallery"`` (train on the gallery), or a shipped codebook's name
            (``"sift-v1"``) or fingerprint (``"sift-v1@..."``, as :meth:`params`
            records it after training).
    """

    type_name = "asmk"
    format_version = 1

    def __init__(
        self, dim: int, *, fingerprint: str | None = None, codebook_size: int | str = "auto",
        alpha: float = 3.0, tau: float = 0.0, multiple_assignment: int = 5,
        quantizer: str = "auto", codebook: str = "auto", kmeans: KMeansConfig | None = None,
        **flat: Any,
    ) -> None:
        super().__init__(dim, fingerprint=fingerprint)
        unknown = sorted(set(flat) - set(_KMEANS_KEYS))
        if unknown:
            raise InputError(f"unknown ASMK parameters {unknown}")
        km = kmeans or KMeansConfig()
        kmeans_iters = flat.get("kmeans_iters", km.iters)
        points_per_word = flat.get("points_per_word", km.points_per_word)
        seed = flat.get("seed", km.seed)
        if codebook_size != "auto" and (not isinstance(codebook_size, (int, np.integer))
                                        or int(codebook_size) < 2):
            raise InputError(f"codebook_size must be 'auto' or an integer >= 2: {codebook_size!r}")
        if quantizer not in ("auto", "flat", "hnsw"):
            raise InputError(f"quantizer must be auto, flat or hnsw; got {quantizer!r}")
        if int(multiple_assignment) < 1:
            raise InputError("multiple_assignment must be >= 1")
        self.codebook_size = codebook_size if codebook_size == "auto" else int(codebook_size)
        self.alpha, self.tau = float(alpha), float(tau)
        self.multiple_assignment = int(multiple_assignment)
        self.quantizer = quantizer
        self.kmeans_iters, self.points_per_word = int(kmeans_iters), int(points_per_word)
        self.seed = int(seed)
        if not isinstance(codebook, str) or not codebook:
            raise InputError(f"codebook must be 'auto', 'gallery' or a codebook name; got "
                             f"{codebook!r}")
        if codebook not in ("auto", "gallery") and "@" not in codebook:
            codebook_by_name(codebook)  # a shipped name, else InputError
        self.codebook = codebook
        self.centroids_: np.ndarray | None = None
        self._quant: Any = None
        self._quant_bytes = 0
        self._segs: list[_Segment] = []
        self._nwords = np.zeros(0, np.int32)  # aggregated words per row
        self._dead = 0  # entries of removed rows still held in segments

    # -- parameters / training -----------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"codebook_size": self.codebook_size, "alpha": self.alpha, "tau": self.tau,
                "multiple_assignment": self.multiple_assignment, "quantizer": self.quantizer,
                "kmeans_iters": self.kmeans_iters, "points_per_word": self.points_per_word,
                "seed": self.seed, "codebook": self.codebook}

    @property
    def is_trained(self) -> bool:
        return self.centroids_ is not None

    @property
    def nbits(self) -> int:
        return self.dim

    def generic_codebook(self) -> Codebook | None:
        """The shipped codebook this index uses instead of training (``None``: train)."""
        if self.codebook == "gallery":
            return None
        if self.codebook == "auto":
            if self.codebook_size != "auto":
                return None
            cb = shipped_codebook(descriptor_of(self.fingerprint) or "")
        else:
            cb = codebook_by_name(self.codebook.split("@", 1)[0])
            if "@" in self.codebook and cb.fingerprint != self.codebook:
                raise InputError(f"codebook {self.codebook} is not the installed "
                                 f"{cb.fingerprint}")
        if cb is None or cb.dim != self.dim:
            if self.codebook != "auto":
                raise InputError(f"codebook {self.codebook} has {cb and cb.dim}-d words; this "
                                 f"index holds {self.dim}-d descriptors")
            return None
        return cb

    def train(self, features: Sequence[LocalFeatures]) -> AsmkIndex:
        import faiss  # lazy: faiss

        feats = check_features(features, dim=self.dim)
        if len(self):
            raise InputError("the index holds images: train a new index instead")
        cb = self.generic_codebook()
        if cb is not None:
            self.codebook_size = cb.words
            self.codebook = cb.fingerprint
            self._set_codebook(cb.centroids)
            return self
        self.codebook = "gallery"
        total = sum(len(f) for f in feats)
        w = auto_codebook_size(total) if self.codebook_size == "auto" else self.codebook_size
        x = sample_descriptors(feats, w * self.points_per_word, seed=self.seed)
        w = min(w, x.shape[0])
        km = faiss.Kmeans(self.dim, w, niter=self.kmeans_iters, seed=self.seed, verbose=False,
                          max_points_per_centroid=self.points_per_word,
                          min_points_per_centroid=1, spherical=False)
        km.train(x)
        self.codebook_size = w
        self._set_codebook(np.ascontiguousarray(km.centroids, np.float32))
        return self

    def _set_codebook(self, centroids: np.ndarray) -> None:
        w = centroids.shape[0]
        kind = self.quantizer if self.quantizer != "auto" else ("flat" if w <= 4096 else "hnsw")
        key = (self.codebook, kind) if "@" in self.codebook else None
        with _QUANT_LOCK:
            hit = _QUANT_CACHE.get(key) if key else None
        if hit is None:
            hit = _quantizer(centroids, kind)
            if key:
                with _QUANT_LOCK:
                    _QUANT_CACHE[key] = hit
        self.centroids_ = centroids
        self._quant, self._quant_bytes = hit

    def _assign(self, desc: np.ndarray, m: int) -> np.ndarray:
        _, ids = self._quant.search(desc, m)
        return ids

    # -- encoding ---------------------------------------------------------------------------
    def _encode(self, desc: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """One image's float descriptors -> ``(words (u,), codes (u, nw))``."""
        assert self.centroids_ is not None
        words = self._assign(desc, m)
        uw, sums = aggregate_residuals(desc, words, self.centroids_)
        return uw, binarize(sums)

    def _add_rows(self, rows: np.ndarray, features: list[LocalFeatures]) -> None:
        cap = int(rows.max()) + 1
        if self._nwords.size < cap:
            self._nwords = np.concatenate([self._nwords, np.zeros(cap - self._nwords.size,
                                                                  np.int32)])
        words, rws, codes = [], [], []
        chunk: list[int] = []
        budget = 0

        def flush() -> None:
            if not chunk:
                return
            desc = float_descriptors(np.concatenate([features[i].descriptors for i in chunk]))
            ids = self._assign(desc, 1)[:, 0]
            at = 0
            for i in chunk:
                n = len(features[i])
                uw, sums = aggregate_residuals(desc[at:at + n], ids[at:at + n], self.centroids_)
                at += n
                words.append(uw)
                rws.append(np.full(uw.size, rows[i], np.int64))
                codes.append(binarize(sums))
                self._nwords[rows[i]] = uw.size
            chunk.clear()

        for i, f in enumerate(features):
            if len(f):
                chunk.append(i)
                budget += len(f)
            if budget >= 262144:
                flush()
                budget = 0
        flush()
        if not words:
            return
        seg = _segment(np.concatenate(words), np.concatenate(rws), np.concatenate(codes),
                       int(self.codebook_size))
        self._segs.append(seg)
        self._maybe_merge()

    def encode(self, features: Sequence[LocalFeatures]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Gallery-side encoding: per image ``(words (u,) int64, codes (u, nw) uint64)``.

        What :meth:`add` stores; with :meth:`add_encoded` a caller can keep the
        codes (16 bytes per word for SIFT) instead of re-quantizing descriptors.
        """
        if not self.is_trained:
            raise InputError("train the ASMK index before encoding")
        out = []
        for f in check_features(features, dim=self.dim):
            if len(f):
                out.append(self._encode(float_descriptors(f.descriptors), 1))
            else:
                out.append((np.zeros(0, np.int64), np.zeros((0, code_words(self.dim)),
                                                            np.uint64)))
        return out

    def add_encoded(self, keys: np.ndarray, encoded: Sequence[tuple[np.ndarray, np.ndarray]]
                    ) -> None:
        """Add images given as :meth:`encode` output (the index must be trained)."""

        if not self.is_trained:
            raise InputError("train the ASMK index before adding encoded images")
        k = as_keys(keys, n=len(encoded))
        self._rows.check_new(k)
        nw, cw = int(self.codebook_size), code_words(self.dim)
        for i, (w, c) in enumerate(encoded):
            w = np.asarray(w)
            if (w.ndim != 1 or c.dtype != np.uint64 or c.shape != (w.size, cw)
                    or (w.size and (w.min() < 0 or w.max() >= nw))
                    or np.unique(w).size != w.size):
                raise InputError(f"encoded image {i}: words must be unique ids < {nw} with "
                                 f"({w.size}, {cw}) uint64 codes")
        rows = self._rows.append(k)
        cap = int(rows.max()) + 1 if rows.size else 0
        if self._nwords.size < cap:
            self._nwords = np.concatenate([self._nwords, np.zeros(cap - self._nwords.size,
                                                                  np.int32)])
        for r, (w, _) in zip(rows.tolist(), encoded, strict=True):
            self._nwords[r] = len(w)
        if sum(len(w) for w, _ in encoded):
            self._segs.append(_segment(
                np.concatenate([np.asarray(w, np.int64) for w, _ in encoded]),
                np.concatenate([np.full(len(w), r, np.int64)
                                for r, (w, _) in zip(rows.tolist(), encoded, strict=True)]),
                np.concatenate([c for _, c in encoded]), nw))
            self._maybe_merge()

    def add_index(self, other: AsmkIndex) -> None:
        """Add every live image of ``other`` (an index with this one's codebook, e.g.
        from :meth:`empty_like`) from its encoded entries: no descriptor is quantized
        again. The same as ``add(other's keys, other's features)``, at the cost of a
        segment copy (a store folds a delta index into its base this way).
        """
        if not isinstance(other, AsmkIndex) or other.centroids_ is None or \
                self.centroids_ is None:
            raise InputError("add_index needs two trained ASMK indexes")
        if other.centroids_ is not self.centroids_ and not (
                other.centroids_.shape == self.centroids_.shape
                and np.array_equal(other.centroids_, self.centroids_)):
            raise InputError("add_index: the two indexes use different codebooks")
        live = np.flatnonzero(other._rows.alive()) if other._rows.capacity else \
            np.zeros(0, np.int64)
        keys = other._rows.row_key[live]
        self._rows.check_new(keys)
        rows = self._rows.append(keys)
        cap = int(rows.max()) + 1 if rows.size else 0
        if self._nwords.size < cap:
            self._nwords = np.concatenate([self._nwords, np.zeros(cap - self._nwords.size,
                                                                  np.int32)])
        self._nwords[rows] = other._nwords[live]
        new_row = np.full(max(other._rows.capacity, 1), -1, np.int64)
        new_row[live] = rows
        for seg in other._segs:
            keep = new_row[seg.rows] >= 0
            if keep.any():
                self._segs.append(_segment(seg.words()[keep], new_row[seg.rows[keep]],
                                           seg.codes[keep], int(self.codebook_size)))
        self._maybe_merge()

    def _maybe_merge(self, full: bool = False) -> None:
        alive = self._alive_rows()
        nw = int(self.codebook_size)
        total = sum(s.size for s in self._segs)
        if full or (self._dead and self._dead > 0.25 * total):
            if self._segs:
                self._segs = [_merge(self._segs, alive, nw)]
            self._dead = 0
            return
        while len(self._segs) >= 2 and self._segs[-2].size <= 2 * self._segs[-1].size:
            b, a = self._segs.pop(), self._segs.pop()
            dead_before = int((~alive[a.rows]).sum() + (~alive[b.rows]).sum())
            self._segs.append(_merge([a, b], alive, nw))
            self._dead -= dead_before

    def _alive_rows(self) -> np.ndarray:
        alive = np.zeros(max(self._rows.capacity, 1), bool)
        alive[: self._rows.capacity] = self._rows.alive()
        return alive

    def _remove_rows(self, rows: np.ndarray) -> None:
        self._dead += int(self._nwords[rows].sum())
        self._nwords[rows] = 0
        self._maybe_merge()

    # -- scoring ---------------------------------------------------------------------------
    def query_codes(self, query: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
        """A query image's aggregated ``(words (u,), codes (u, nw))`` (multiple assignment)."""
        desc = float_descriptors(query.descriptors)
        m = min(self.multiple_assignment, int(self.codebook_size))
        return self._encode(desc, m)

    def score_rows(self, query: LocalFeatures) -> np.ndarray:
        r = self._rows.capacity
        scores = np.zeros(r, np.float64)
        if len(query) == 0 or not self.is_trained:
            return scores.astype(np.float32)
        qw, qc = self.query_codes(query)
        for seg in self._segs:
            self._accumulate(seg, qw, qc, scores)
        norm = np.sqrt(float(qw.size) * self._nwords[:r].astype(np.float64))
        out = np.divide(scores, norm, out=np.zeros(r), where=norm > 0)
        return out.astype(np.float32)

    def _accumulate(self, seg: _Segment, qw: np.ndarray, qc: np.ndarray,
                    scores: np.ndarray) -> None:
        lens = seg.offsets[qw + 1] - seg.offsets[qw]
        csum = np.cumsum(lens)
        start = 0
        while start < qw.size:  # blocks of query words with <= _BLOCK_PAIRS entries
            stop = int(np.searchsorted(csum, (csum[start - 1] if start else 0) + _BLOCK_PAIRS,
                                       side="right"))
            stop = max(stop, start + 1)
            pos, owner = segment_gather(seg.offsets, qw[start:stop])
            if pos.size:
                u = hamming_similarity(seg.codes[pos], qc[start:stop][owner], self.nbits)
                val = selective_kernel(u, alpha=self.alpha, tau=self.tau)
                nz = val != 0
                scores += np.bincount(seg.rows[pos[nz]], weights=val[nz], minlength=scores.size)
            start = stop

    def pairwise(self, keys: np.ndarray) -> np.ndarray:
        """``(n, n)`` float32 ASMK similarities among gallery images (diagonal 1)."""

        rows = self._rows.rows_of(as_keys(keys, unique=False))
        n = rows.size
        out = np.zeros((n, n), np.float64)
        if n == 0:
            return out.astype(np.float32)
        pos_of = np.full(max(self._rows.capacity, 1), -1, np.int64)
        pos_of[rows] = np.arange(n)  # (a key given twice keeps its last position)
        words, who, codes = [], [], []
        for seg in self._segs:
            sel = np.flatnonzero(pos_of[seg.rows] >= 0)
            if sel.size:
                words.append(np.searchsorted(seg.offsets, sel, side="right") - 1)
                who.append(pos_of[seg.rows[sel]])
                codes.append(seg.codes[sel])
        if words:
            w = np.concatenate(words)
            p = np.concatenate(who)
            c = np.concatenate(codes)
            order = np.argsort(w, kind="stable")
            w, p, c = w[order], p[order], c[order]
            # every pair of entries within one word: entry e pairs with e+1 .. end(e)-1
            starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
            ends = np.r_[starts[1:], w.size]
            end_of = np.repeat(ends, ends - starts)
            cnt = end_of - np.arange(w.size) - 1
            for lo in range(0, w.size, 65536):  # bounded temporaries
                hi = min(w.size, lo + 65536)
                cc = cnt[lo:hi]
                t = int(cc.sum())
                if not t:
                    continue
                first = np.repeat(np.arange(lo, hi), cc)
                second = first + 1 + (np.arange(t) - np.repeat(np.cumsum(cc) - cc, cc))
                u = hamming_similarity(c[first], c[second], self.nbits)
                v = selective_kernel(u, alpha=self.alpha, tau=self.tau)
                out += np.bincount(p[first] * n + p[second], weights=v,
                                   minlength=n * n).reshape(n, n)
            out = out + out.T
        nw = self._nwords[rows].astype(np.float64)
        norm = np.sqrt(np.outer(nw, nw))
        out = np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)
        same = rows[:, None] == rows[None, :]
        out[same & (nw[:, None] > 0)] = 1.0
        return out.astype(np.float32)

    # -- copy / size / persistence ---------------------------------------------------------
    def copy(self) -> AsmkIndex:
        out = AsmkIndex.__new__(AsmkIndex)
        out.__dict__.update(self.__dict__)
        out._rows = self._rows.copy()
        out._nwords = self._nwords.copy()
        out._segs = list(self._segs)  # immutable segments are shared
        return out

    def empty_like(self) -> AsmkIndex:
        """An empty index with this one's codebook (scores comparable with this index's)."""

        out = AsmkIndex.__new__(AsmkIndex)
        out.__dict__.update(self.__dict__)  # parameters, codebook, quantizer (read-only)
        out._rows = Rows()
        out._nwords = np.zeros(0, np.int32)
        out._segs = []
        out._dead = 0
        return out

    def nbytes(self) -> int:
        n = sum(s.offsets.nbytes + s.rows.nbytes + s.codes.nbytes for s in self._segs)
        n += self._nwords.nbytes + self._rows.row_key.nbytes
        if self.centroids_ is not None:
            n += self.centroids_.nbytes + self._quant_bytes  # the quantizer holds a copy
        return int(n)

    def entry_bytes(self) -> int:
        """Bytes per inverted-file entry (code + row)."""
        return code_words(self.dim) * 8 + 4

    def save(self, path: str | os.PathLike[str]) -> None:
        if not self.is_trained:
            raise InputError("an untrained ASMK index has nothing to save")
        merged = (_merge(self._segs, self._alive_rows(), int(self.codebook_size)) if self._segs
                  else _segment(np.zeros(0, np.int64), np.zeros(0, np.int64),
                                np.zeros((0, code_words(self.dim)), np.uint64),
                                int(self.codebook_size)))
        assert self.centroids_ is not None
        self._commit(path, {
            "centroids": (".npy", write_array(self.centroids_)),
            "row_key": (".npy", write_array(self._rows.row_key)),
            "nwords": (".npy", write_array(self._nwords[: self._rows.capacity])),
            "offsets": (".npy", write_array(merged.offsets)),
            "rows": (".npy", write_array(merged.rows)),
            "codes": (".npy", write_array(merged.codes)),
        })

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, fingerprint: str | None = None,
             dim: int | None = None) -> AsmkIndex:
        header = cls._load_header(path, fingerprint=fingerprint, dim=dim)
        p = Path(path)
        files = header.get("files", {})
        need = {"centroids", "row_key", "nwords", "offsets", "rows", "codes"}
        if set(files) != need:
            raise FormatError(f"{p}/header.json must name {sorted(need)}")
        d = int(header["dim"])
        arr = {k: read_array(p / files[k]) for k in need}
        idx = cls(d, fingerprint=header.get("fingerprint"), **header["params"])
        c = arr["centroids"]
        w = int(header["params"]["codebook_size"])
        if c.dtype != np.float32 or c.shape != (w, d):
            raise FormatError(f"{p}: centroids {c.dtype} {c.shape}, expected ({w}, {d}) float32")
        seg = _Segment(arr["offsets"].astype(np.int64), arr["rows"].astype(np.int32),
                       arr["codes"])
        if (seg.offsets.shape != (w + 1,) or seg.codes.dtype != np.uint64
                or seg.codes.shape != (seg.size, code_words(d)) or int(seg.offsets[-1]) != seg.size
                or arr["nwords"].shape != arr["row_key"].shape):
            raise FormatError(f"{p}: inverted file arrays do not fit together")
        recorded = str(header["params"].get("codebook", "gallery"))
        if recorded not in ("auto", "gallery"):
            check_recorded(recorded, c, what=f"ASMK index {p}")
        idx.codebook = recorded
        idx._set_codebook(c)
        idx._rows = Rows(arr["row_key"])
        idx._nwords = arr["nwords"].astype(np.int32)
        idx._segs = [seg] if seg.size else []
        idx.generation = int(header.get("generation", 0))
        if len(idx) != int(header["ntotal"]):
            raise FormatError(f"{p}: {len(idx)} live rows, header says {header['ntotal']}")
        return idx
