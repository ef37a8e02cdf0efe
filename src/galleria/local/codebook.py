"""Visual-word codebooks trained once, shipped with galleria, versioned like a model.

An ASMK index needs a codebook (``W`` centroids of the local descriptors). Trained
on the gallery's own descriptors it is as good as the gallery is large: 30 small
product images give a few thousand descriptors, 256 words, and a weak index. A
*generic* codebook is trained once on a large, varied sample of real images
(``benchmarks/build_codebook.py``: SIFT descriptors of the 50 Caltech-101 classes of
a fixed seeded split, classes no evaluation of galleria's local search uses) and
shipped in the package, so a gallery of any size starts from the same words.

On disk a codebook is a folder: ``header.json`` (``{type: "codebook", format_version,
params: {name, descriptor, dim, words, build...}, fingerprint}``) and
``centroids.npy`` (``(W, d)`` float16, to keep the wheel small; used as float32).
Its fingerprint is ``<name>@<digest of the float16 bytes>``: every ASMK index built
with it records it (``AsmkIndex.params()["codebook"]``), and loading refuses an
index whose recorded fingerprint differs from the centroids it holds, or from the
installed codebook of the same name.

    cb = shipped_codebook("sift")          # Codebook or None (no codebook for xfeat yet)
    cb.centroids                           # (W, d) float32
    cb.fingerprint                         # "sift-v1@3f2c..."
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.io.artifact import load_header, make_header, save_header
from galleria.io.atomic import atomic_open, load_array

log = logging.getLogger(__name__)

TYPE = "codebook"
FORMAT_VERSION = 1
#: Folder of the codebooks shipped in the package (package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "codebooks"
#: The shipped codebook of each local extractor (by extractor name).
SHIPPED = {"sift": "sift-v1"}


def centroid_digest(name: str, centroids16: np.ndarray) -> str:
    """``<name>@<sha256[:16]>`` of the float16 centroid bytes (C order) and their shape."""
    c = np.ascontiguousarray(centroids16, np.float16)
    h = hashlib.sha256()
    h.update(f"{name}|{c.shape[0]}x{c.shape[1]}|".encode())
    h.update(c.tobytes())
    return f"{name}@{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class Codebook:
    """A trained codebook.

    Attributes:
        name: versioned name (``sift-v1``); a new build is a new name.
        descriptor: the local extractor whose descriptors it quantizes (``sift``).
        centroids16: ``(W, d)`` float16 centroids as stored.
        info: how it was built (images, descriptors, k-means settings, seconds).
    """

    name: str
    descriptor: str
    centroids16: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.centroids16
        if c.ndim != 2 or c.shape[0] < 2 or c.dtype != np.float16 or not np.isfinite(c).all():
            raise InputError(f"codebook centroids must be finite (W >= 2, d) float16; got "
                             f"{c.dtype} {c.shape}")

    @property
    def centroids(self) -> np.ndarray:
        """``(W, d)`` float32."""
        return np.ascontiguousarray(self.centroids16, np.float32)

    @property
    def words(self) -> int:
        return int(self.centroids16.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids16.shape[1])

    @property
    def fingerprint(self) -> str:
        return centroid_digest(self.name, self.centroids16)

    @classmethod
    def from_float(cls, name: str, descriptor: str, centroids: np.ndarray,
                   info: dict[str, Any] | None = None) -> Codebook:
        return cls(name, descriptor, np.asarray(centroids, np.float32).astype(np.float16),
                   dict(info or {}))


def train_codebook(sample: np.ndarray, words: int, *, seed: int = 0, iters: int = 20
                   ) -> np.ndarray:
    """FAISS k-means of ``(n, d)`` float32 descriptors -> ``(words, d)`` float32 centroids.

    Deterministic for a seed at a fixed FAISS thread count (the build script uses 1).
    """
    import faiss  # heavy optional dependency: only when training

    x = np.ascontiguousarray(sample, np.float32)
    if x.ndim != 2 or x.shape[0] < words:
        raise InputError(f"need at least {words} descriptors to train {words} words; got "
                         f"{x.shape}")
    km = faiss.Kmeans(x.shape[1], int(words), niter=int(iters), seed=int(seed), verbose=False,
                      max_points_per_centroid=max(1, x.shape[0] // int(words) + 1),
                      min_points_per_centroid=1, spherical=False)
    km.train(x)
    return np.ascontiguousarray(km.centroids, np.float32)


def save_codebook(path: str | os.PathLike[str], cb: Codebook) -> None:
    """Write ``cb`` as a folder (centroids first, header last: a reader never sees a
    header without its centroids)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    with atomic_open(p / "centroids.npy", "wb") as fh:
        np.save(fh, np.ascontiguousarray(cb.centroids16), allow_pickle=False)
    params = {"name": cb.name, "descriptor": cb.descriptor, "dim": cb.dim, "words": cb.words,
              "build": cb.info}
    save_header(p / "header.json", make_header(type=TYPE, format_version=FORMAT_VERSION,
                                               params=params, fingerprint=cb.fingerprint))


def load_codebook(path: str | os.PathLike[str]) -> Codebook:
    """Read a codebook folder; its centroids must hash to the header's fingerprint."""
    p = Path(path)
    header = load_header(p / "header.json", type=TYPE, format_version=FORMAT_VERSION)
    prm = header.get("params", {})
    try:
        c = load_array(p / "centroids.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{p}/centroids.npy is not a readable .npy file: {exc}") from exc
    if c.dtype != np.float16 or c.shape != (prm.get("words"), prm.get("dim")):
        raise FormatError(f"{p}: centroids {c.dtype} {c.shape}, header says "
                          f"({prm.get('words')}, {prm.get('dim')}) float16")
    cb = Codebook(str(prm["name"]), str(prm["descriptor"]), c, dict(prm.get("build", {})))
    if cb.fingerprint != header.get("fingerprint"):
        raise FormatError(f"{p}: centroids hash to {cb.fingerprint}, the header records "
                          f"{header.get('fingerprint')} (corrupt or edited codebook)")
    return cb


@lru_cache(maxsize=8)
def _shipped(name: str) -> Codebook | None:
    folder = SHIPPED_DIR / name
    if not (folder / "header.json").is_file():
        return None
    return load_codebook(folder)


def shipped_codebook(descriptor: str) -> Codebook | None:
    """The codebook shipped for a local extractor (``sift``), or ``None``."""
    name = SHIPPED.get(descriptor)
    return _shipped(name) if name else None


def codebook_by_name(name: str) -> Codebook:
    """A shipped codebook by its versioned name (``sift-v1``)."""
    cb = _shipped(name) if name in SHIPPED.values() else None
    if cb is None:
        raise InputError(f"no shipped codebook named {name!r}; shipped: "
                         f"{sorted(SHIPPED.values())}")
    return cb


def descriptor_of(fingerprint: str | None) -> str | None:
    """The local extractor name a space / extractor fingerprint starts with
    (``sift-1000-1024@...`` -> ``sift``), or ``None``."""
    if not fingerprint:
        return None
    return str(fingerprint).split("@", 1)[0].split("-", 1)[0] or None


def check_recorded(recorded: str, centroids: np.ndarray, *, what: str) -> None:
    """Refuse an index whose recorded codebook fingerprint does not match.

    ``recorded`` is ``<name>@<digest>``. The centroids the index holds must hash to
    it, and when galleria ships a codebook of that name its fingerprint must be the
    same (a shipped name never changes content; a new build gets a new name).
    """
    name = recorded.split("@", 1)[0]
    got = centroid_digest(name, np.asarray(centroids).astype(np.float16))
    if got != recorded:
        raise CompatibilityError(f"{what}: its centroids hash to {got}, it records codebook "
                                 f"{recorded}")
    if name in SHIPPED.values():
        cb = _shipped(name)
        if cb is not None and cb.fingerprint != recorded:
            raise CompatibilityError(f"{what}: built with codebook {recorded}, the installed "
                                     f"{name} is {cb.fingerprint}; rebuild the index")
