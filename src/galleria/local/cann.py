"""CANN-style kernel voting over one FAISS index of every gallery descriptor.

For each query descriptor the ``knn`` nearest gallery descriptors are found;
each gallery image takes, from its nearest descriptor among them, the kernel
``phi(r)`` of :func:`galleria.local.kernels.cann_kernel` (so each (query
feature, image) pair counts once), and an image's score is the sum over query
features divided by the number of query features. Reference: Aiger et al.,
"Yes, we CANN: Constrained Approximate Nearest Neighbors for local feature-based
visual localization" (ICCV 2023), which searches with random grids; here the
neighbours come from FAISS.

``index="flat"`` keeps the descriptors exactly (``IndexFlatL2``: 4 d bytes
each, exhaustive search, for small galleries); any FAISS factory string
(``"IVF4096,PQ32"``, ``"IVF1024,SQ8"`` ...) is trained on a seeded sample of
the first batch (or of :meth:`CannIndex.train`'s features) and searched with
``nprobe`` lists. ``"auto"`` chooses flat below 2M training descriptors and
``IVF{4 sqrt(n)},PQ{d/4}`` above, resolved when training.

Descriptor ids are ``row << 16 | j`` (at most 65,536 keypoints per image), so
a FAISS result names its image without a lookup; ``remove`` deletes the ids
from FAISS (``remove_ids``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.local.asmk import sample_descriptors
from galleria.local.base import LocalIndex, Rows
from galleria.local.features import check_features, float_descriptors
from galleria.local.kernels import cann_kernel
from galleria.local.persist import read_array, write_array, write_bytes_file
from galleria.types import LocalFeatures

log = logging.getLogger(__name__)

ID_SHIFT = 16
MAX_KEYPOINTS = 1 << ID_SHIFT
_FLAT_LIMIT = 2_000_000


def auto_factory(n_descriptors: int, dim: int) -> str:
    """``flat`` below 2M descriptors, else ``IVF{~4 sqrt(n)},PQ{d/4}``."""
    if n_descriptors < _FLAT_LIMIT:
        return "flat"
    nlist = int(2 ** round(np.log2(4 * np.sqrt(n_descriptors))))
    return f"IVF{nlist},PQ{max(1, dim // 4)}"


def vote(dist2: np.ndarray, ids: np.ndarray, n_rows: int, *, p0: float, p1: float) -> np.ndarray:
    """Kernel votes of one query -> ``(n_rows,)`` scores (sum over query features / n).

    Args:
        dist2: ``(n, knn)`` squared L2 distances, ascending per row.
        ids: ``(n, knn)`` descriptor ids (``row << 16 | j``; ``-1`` = none).
    """
    n = dist2.shape[0]
    ok = ids >= 0
    q = np.broadcast_to(np.arange(n)[:, None], ids.shape)[ok]
    rows = (ids[ok] >> ID_SHIFT).astype(np.int64)
    r = np.sqrt(np.maximum(dist2[ok], 0.0))
    pair = q * np.int64(n_rows) + rows
    _, first = np.unique(pair, return_index=True)  # nearest descriptor of each image
    phi = cann_kernel(r[first], p0=p0, p1=p1)
    out = np.bincount(rows[first], weights=phi, minlength=n_rows)
    return (out / max(n, 1)).astype(np.float32)


#: Kernel settings per local extractor, chosen on ukbench56 + oxford_affine (not on the
#: SMVS / RParis / Caltech test sets; benchmarks/results/local.md has the sweep).
PRESETS: dict[str, dict[str, float | int]] = {
    "sift": {"knn": 10, "p0": 0.5, "p1": 0.3},
    "xfeat": {"knn": 10, "p0": 1.0, "p1": 0.3},
}


class CannIndex(LocalIndex):
    """Kernel voting over a FAISS descriptor index (see the module docstring).

    Args:
        dim: descriptor dimension.
        fingerprint: local extractor fingerprint.
        index: ``"flat"``, ``"auto"`` or a FAISS factory string (L2 metric).
        knn: neighbours per query descriptor.
        p0, p1: kernel radius (L2 distance between unit descriptors, in [0, 2])
            and shape.
        nprobe: inverted lists visited (IVF indexes).
        train_size: descriptors sampled to train an IVF / PQ index.
        seed: seeds the training sample.
    """

    type_name = "cann"
    format_version = 1

    def __init__(
        self, dim: int, *, fingerprint: str | None = None, index: str = "auto", knn: int = 10,
        p0: float = 0.5, p1: float = 0.3, nprobe: int = 16, train_size: int = 500_000,
        seed: int = 0,
    ) -> None:
        super().__init__(dim, fingerprint=fingerprint)
        cann_kernel(np.zeros(1, np.float32), p0=p0, p1=p1)  # validates p0, p1
        if int(knn) < 1 or int(nprobe) < 1:
            raise InputError("knn and nprobe must be >= 1")
        self.index_spec = str(index)
        self.knn, self.p0, self.p1 = int(knn), float(p0), float(p1)
        self.nprobe, self.train_size, self.seed = int(nprobe), int(train_size), int(seed)
        self._faiss: Any = None
        self._ndesc = np.zeros(0, np.int32)

    def params(self) -> dict[str, Any]:
        return {"index": self.index_spec, "knn": self.knn, "p0": self.p0, "p1": self.p1,
                "nprobe": self.nprobe, "train_size": self.train_size, "seed": self.seed}

    @property
    def is_trained(self) -> bool:
        return self._faiss is not None

    def train(self, features: Sequence[LocalFeatures]) -> CannIndex:
        import faiss  # lazy: faiss

        feats = check_features(features, dim=self.dim)
        if len(self):
            raise InputError("the index holds images: train a new index instead")
        total = sum(len(f) for f in feats)
        if self.index_spec == "auto":
            self.index_spec = auto_factory(total, self.dim)
        if self.index_spec == "flat":
            self._faiss = faiss.IndexIDMap2(faiss.IndexFlatL2(self.dim))
            return self
        base = faiss.index_factory(self.dim, self.index_spec, faiss.METRIC_L2)
        if not base.is_trained:
            x = sample_descriptors(feats, self.train_size, seed=self.seed)
            base.train(x)
        self._faiss = base if hasattr(base, "nlist") else faiss.IndexIDMap2(base)
        return self

    def _add_rows(self, rows: np.ndarray, features: list[LocalFeatures]) -> None:
        cap = int(rows.max()) + 1
        if self._ndesc.size < cap:
            self._ndesc = np.concatenate([self._ndesc, np.zeros(cap - self._ndesc.size,
                                                                np.int32)])
        big = [i for i, f in enumerate(features) if len(f) > MAX_KEYPOINTS]
        if big:
            raise InputError(f"images {big[:5]} have more than {MAX_KEYPOINTS} keypoints")
        start = 0
        while start < len(features):  # chunks of ~256k descriptors
            stop, n = start, 0
            while stop < len(features) and (n == 0 or n + len(features[stop]) <= 262144):
                n += len(features[stop])
                stop += 1
            parts = [i for i in range(start, stop) if len(features[i])]
            if parts:
                x = float_descriptors(np.concatenate([features[i].descriptors for i in parts]))
                ids = np.concatenate([(np.int64(rows[i]) << ID_SHIFT)
                                      + np.arange(len(features[i]), dtype=np.int64)
                                      for i in parts])
                self._faiss.add_with_ids(x, ids)
            for i in range(start, stop):
                self._ndesc[rows[i]] = len(features[i])
            start = stop

    def _remove_rows(self, rows: np.ndarray) -> None:
        import faiss  # lazy: faiss

        ids = np.concatenate([(np.int64(r) << ID_SHIFT) + np.arange(int(self._ndesc[r]),
                                                                      dtype=np.int64)
                              for r in rows])
        if ids.size:
            self._faiss.remove_ids(faiss.IDSelectorBatch(ids))
        self._ndesc[rows] = 0

    def _search_params(self) -> Any:
        import faiss  # lazy: faiss

        if faiss.try_extract_index_ivf(self._faiss) is not None:
            return faiss.SearchParametersIVF(nprobe=self.nprobe)
        return None

    def neighbours(self, desc: np.ndarray, knn: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(n, knn)`` squared distances and descriptor ids of float descriptors ``desc``."""
        k = min(knn or self.knn, max(1, self._faiss.ntotal))
        params = self._search_params()
        if params is None:
            return self._faiss.search(desc, k)
        return self._faiss.search(desc, k, params=params)

    def score_rows(self, query: LocalFeatures) -> np.ndarray:
        r = self._rows.capacity
        if len(query) == 0 or not self.is_trained or self._faiss.ntotal == 0:
            return np.zeros(r, np.float32)
        d2, ids = self.neighbours(float_descriptors(query.descriptors))
        return vote(d2, ids, r, p0=self.p0, p1=self.p1)

    def copy(self) -> CannIndex:
        import faiss  # lazy: faiss

        out = CannIndex.__new__(CannIndex)
        out.__dict__.update(self.__dict__)
        out._rows = self._rows.copy()
        out._ndesc = self._ndesc.copy()
        out._faiss = faiss.clone_index(self._faiss) if self._faiss is not None else None
        return out

    def empty_like(self) -> CannIndex:
        """An empty index with this one's trained FAISS structure (same parameters)."""
        import faiss  # lazy: faiss

        out = CannIndex.__new__(CannIndex)
        out.__dict__.update(self.__dict__)
        out._rows = Rows()
        out._ndesc = np.zeros(0, np.int32)
        if self._faiss is not None and self.index_spec == "flat":
            out._faiss = faiss.IndexIDMap2(faiss.IndexFlatL2(self.dim))
        elif self._faiss is not None:  # IVF: keeps the trained coarse quantizer and codes
            out._faiss = faiss.clone_index(self._faiss)
            out._faiss.reset()
        return out

    def nbytes(self) -> int:
        import faiss  # lazy: faiss

        n = self._ndesc.nbytes + self._rows.row_key.nbytes
        if self._faiss is not None:
            n += int(faiss.serialize_index(self._faiss).nbytes)
        return int(n)

    def save(self, path: str | os.PathLike[str]) -> None:
        import faiss  # lazy: faiss

        if not self.is_trained:
            raise InputError("an untrained CANN index has nothing to save")
        data = faiss.serialize_index(self._faiss).tobytes()
        self._commit(path, {
            "faiss": (".faiss", write_bytes_file(data)),
            "row_key": (".npy", write_array(self._rows.row_key)),
            "ndesc": (".npy", write_array(self._ndesc[: self._rows.capacity])),
        })

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, fingerprint: str | None = None,
             dim: int | None = None) -> CannIndex:
        import faiss  # lazy: faiss

        header = cls._load_header(path, fingerprint=fingerprint, dim=dim)
        p = Path(path)
        files = header.get("files", {})
        if set(files) != {"faiss", "row_key", "ndesc"}:
            raise FormatError(f"{p}/header.json must name faiss, row_key and ndesc files")
        idx = cls(int(header["dim"]), fingerprint=header.get("fingerprint"), **header["params"])
        try:
            buf = np.frombuffer((p / files["faiss"]).read_bytes(), dtype=np.uint8)
            idx._faiss = faiss.deserialize_index(buf)
        except RuntimeError as exc:
            raise FormatError(f"{p / files['faiss']} is not a FAISS index: {exc}") from exc
        idx._rows = Rows(read_array(p / files["row_key"]))
        idx._ndesc = read_array(p / files["ndesc"]).astype(np.int32)
        idx.generation = int(header.get("generation", 0))
        if (idx._faiss.d != idx.dim or idx._ndesc.shape != idx._rows.row_key.shape
                or int(idx._ndesc.sum()) != idx._faiss.ntotal or len(idx) != header["ntotal"]):
            raise FormatError(f"{p}: FAISS index and row tables do not fit together")
        return idx
