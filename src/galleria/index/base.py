"""The index contract shared by every backend.

An index maps int64 keys to ``(D,)`` float32 vectors and answers inner-product
top-k queries (vectors are L2-normalised upstream, so inner product = cosine).
Every backend returns :class:`~galleria.types.SearchResult` with int64 keys and
``-1`` / ``-inf`` padding when fewer than ``k`` items exist.

Keys are non-negative int64 (``-1`` marks a missing result). Adding a key that
is already present, or the same key twice in one batch, is an
:class:`~galleria.errors.InputError`; removing an unknown key is not.

Persistence: ``save(dir)`` writes the data files (``vectors.<id>.npy``,
``keys.<id>.npy`` or ``index.<id>.faiss`` ..., a fresh ``<id>`` per save), each
atomically, then ``header.json`` (type, format version, params, fingerprint,
dim, ntotal, generation, and the names of its data files), then deletes the
previous save's files. A crash at any point leaves the old header naming the
old, complete files. ``load(dir, fingerprint=..., dim=...)`` checks the header
and raises :class:`~galleria.errors.CompatibilityError` naming both values on a
mismatch. Indexes are not safe for concurrent mutation from several threads, but
``search`` is reentrant: any number of threads may search one index at once as long
as nobody mutates it (no per-call state lives on the index). :meth:`Index.copy`
gives an independent index to mutate instead.

The shared checks for every public method live here (:func:`as_keys`,
:func:`check_k`, :meth:`Index._queries`) so all backends reject the same bad
input with the same message.
"""

from __future__ import annotations

import abc
import math
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.io.artifact import check_fingerprint, load_header, make_header, save_header
from galleria.types import SearchResult
from galleria.validate import as_embeddings

HEADER_NAME = "header.json"
_SAVE_FILE = re.compile(r"\.[0-9a-f]{12}\.[a-z.]+")


def as_keys(keys: object, *, n: int | None = None, unique: bool = True) -> np.ndarray:
    """Return ``keys`` as a ``(N,)`` int64 array, or raise InputError.

    Rejects non-integer dtypes (floats, bools, strings, objects), negative keys
    (``-1`` is the missing-result marker), a length other than ``n`` (when given)
    and, with ``unique=True``, a key repeated within the batch.
    """
    arr = np.asarray(keys)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise InputError(f"keys must have shape (N,); got shape {arr.shape}")
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"keys must be integers; got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InputError("keys must fit in int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if n is not None and arr.shape[0] != n:
        raise InputError(f"got {arr.shape[0]} keys for {n} vectors")
    if arr.size and int(arr.min()) < 0:
        raise InputError(f"keys must be >= 0 (-1 marks a missing result); got {int(arr.min())}")
    if unique and arr.size > 1:
        s = np.sort(arr)
        dup = s[1:][s[1:] == s[:-1]]
        if dup.size:
            raise InputError(
                f"duplicate keys in one batch: {np.unique(dup)[:5].tolist()}"
                f"{' ...' if np.unique(dup).size > 5 else ''}"
            )
    return arr


def check_k(k: object) -> int:
    """``k`` as a positive int, or InputError."""
    if type(k) is int and k > 0:  # fast path
        return k
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise InputError(f"k must be a positive integer; got {k!r}")
    if int(k) <= 0:
        raise InputError(f"k must be a positive integer; got {int(k)}")
    return int(k)


def pad_result(scores: np.ndarray, ids: np.ndarray, k: int) -> SearchResult:
    """``(Q, k')`` float32 scores and int64 keys (k' <= k) as a ``(Q, k)`` result."""
    return SearchResult(np.ascontiguousarray(scores, dtype=np.float32),
                        np.ascontiguousarray(ids, np.int64)).pad(k)


def _all_finite(x: np.ndarray) -> bool:
    """True if a float32 array holds no NaN/inf (a cheap check; False may be a false alarm)."""
    # a NaN or inf makes the sum NaN/inf, so a finite sum proves every value finite
    # (an overflowing sum of finite values is a false alarm: the full check runs then)
    return math.isfinite(float(np.add.reduce(x, axis=None)))


class Index(abc.ABC):
    """Abstract inner-product index over int64 keys."""

    type_name: ClassVar[str]
    format_version: ClassVar[int] = 1

    def __init__(self, dim: int, *, fingerprint: str | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) <= 0:
            raise InputError(f"dim must be a positive integer; got {dim!r}")
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
    def copy(self) -> Index:
        """An independent deep copy: changing either leaves the other as it was.

        The store builds each new snapshot view on a copy while readers keep
        searching the old index.
        """

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

    @property
    def ntotal(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, ntotal={len(self)}, params={self.params()})"

    # -- shared helpers for backends -------------------------------------------------

    def _queries(self, queries: object) -> np.ndarray:
        q = queries
        if (
            type(q) is np.ndarray
            and q.dtype == np.float32
            and q.ndim == 2
            and q.shape[0] > 0
            and q.shape[1] == self.dim
            and q.flags.c_contiguous
            and _all_finite(q)
        ):
            return q  # fast path for the common case (per-query overhead matters at k-NN speed)
        return as_embeddings(queries, name="queries", dim=self.dim)

    def _vectors(self, vectors: object) -> np.ndarray:
        return as_embeddings(vectors, name="vectors", dim=self.dim)

    def _header(self, **extra: Any) -> dict[str, Any]:
        return make_header(
            type=self.type_name,
            format_version=self.format_version,
            params=self.params(),
            fingerprint=self.fingerprint,
            dim=self.dim,
            ntotal=len(self),
            generation=int(self.generation),
            **extra,
        )

    def _commit(
        self,
        path: str | os.PathLike[str],
        writers: dict[str, tuple[str, Callable[[Path], None]]],
        **extra: Any,
    ) -> None:
        """Save data files then the header, so a crash at any point keeps the old index.

        ``writers`` maps a role (``"vectors"``) to ``(file suffix, write(path))``.
        Each save writes its data files under fresh names ``<role>.<save id><suffix>``
        (each atomically), then atomically replaces ``header.json``, which names
        them, and only then deletes the previous save's data files. A reader only
        follows the header, so it sees either the old index or the new one, never
        a mix.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        save_id = secrets.token_hex(6)
        files: dict[str, str] = {}
        try:
            for role, (suffix, write) in writers.items():
                name = f"{role}.{save_id}{suffix}"
                files[role] = name
                write(root / name)
            save_header(root / HEADER_NAME, self._header(files=files, **extra))
        except BaseException:
            for name in files.values():  # the old header still names the old files
                (root / name).unlink(missing_ok=True)
            raise
        keep = set(files.values())
        for role, (suffix, _) in writers.items():
            for old in root.glob(f"{role}.*{suffix}"):
                if old.name not in keep and _SAVE_FILE.fullmatch(old.name[len(role) :]):
                    old.unlink(missing_ok=True)

    @classmethod
    def _load_header(
        cls, path: str | os.PathLike[str], *, fingerprint: str | None, dim: int | None
    ) -> dict[str, Any]:
        """Read and check ``path/header.json``: type, version, dim and fingerprint."""
        p = Path(path)
        header = load_header(p / HEADER_NAME, type=cls.type_name, format_version=cls.format_version)
        for field in ("dim", "ntotal", "params"):
            if field not in header:
                raise FormatError(f"{p / HEADER_NAME} has no {field!r} field")
        if dim is not None and int(dim) != int(header["dim"]):
            raise CompatibilityError(
                f"index at {p}: dimension mismatch: expected {int(dim)}, got {header['dim']}"
            )
        check_fingerprint(fingerprint, header.get("fingerprint"), what=f"index at {p}")
        files = header.get("files", {})
        if not isinstance(files, dict):
            raise FormatError(f"{p / HEADER_NAME} has a malformed 'files' field")
        for name in files.values():
            if not (p / str(name)).is_file():
                raise FormatError(f"index at {p}: missing data file {name!r} (named by its header)")
        return header


def read_header_type(path: str | os.PathLike[str]) -> str:
    """The ``type`` field of ``path/header.json`` (for dispatch in the factory)."""
    from galleria.io.atomic import read_json

    p = Path(path) / HEADER_NAME
    if not p.is_file():
        raise FormatError(f"{p} is missing: {Path(path)} is not a saved galleria index")
    try:
        header = read_json(p)
    except ValueError as exc:
        raise FormatError(f"{p} is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FormatError(f"{p} has no 'type' field")
    return header["type"]
