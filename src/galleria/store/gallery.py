"""A gallery on disk: items keyed by stable string ids, their vectors in one or more
embedding spaces (one per model fingerprint), and a search index per space.

Layout of a gallery folder::

    gallery.json             header {type: gallery, format_version, ...}
    gallery.sqlite           items, spaces, segments, vectors, change log, failures
    segments/<space>/*.npy   vector arrays (append-only, compacted in place)
    indexes/<space>/CURRENT  name of the live index folder (swapped atomically)

Crash safety: a vector array is written (tmp + fsync + rename) before the
SQLite transaction that references it commits; an uncommitted array is an
orphan that :meth:`Gallery.compact` deletes. An index folder is complete before
``CURRENT`` points to it. After any crash the store is consistent and each
(item, space) pair holds at most one vector.

Two models at once: vectors of different fingerprints live side by side (an
upgrade moves items from one space to another in single transactions);
``primary_space`` is the one searched by default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.fingerprint import slug
from galleria.io.artifact import load_header, make_header, save_header
from galleria.io.atomic import read_json, write_json, write_npy
from galleria.store.schema import FORMAT_VERSION, SCHEMA
from galleria.types import MISSING_KEY, SearchResult
from galleria.validate import as_embeddings

log = logging.getLogger(__name__)

HEADER = "gallery.json"
DB = "gallery.sqlite"
COMPACT_SEGMENTS = 64
"""Merge a space's small vector arrays once it has more than this many."""
LARGE_SEGMENT = 1 << 16
"""Arrays with at least this many rows are left alone by compaction (tiered merging)."""


@dataclass(frozen=True)
class SpaceInfo:
    """One embedding space of a gallery."""

    space: str
    slug: str
    dim: int
    count: int
    info: dict[str, Any]


@dataclass(frozen=True)
class Failure:
    id: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "path": self.path, "reason": self.reason}


class Gallery:
    """Open with :meth:`create`, :meth:`open` or :meth:`open_or_create`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, readonly: bool) -> None:
        self.path = path
        self._conn = conn
        self.readonly = readonly
        self._indexes: dict[str, Any] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ open
    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Gallery:
        p = Path(path)
        if (p / HEADER).exists():
            raise InputError(f"{p} already holds a gallery; open it instead")
        if p.exists() and not p.is_dir():
            raise InputError(f"{p} exists and is not a folder")
        p.mkdir(parents=True, exist_ok=True)
        from galleria import __version__

        conn = _connect(p / DB)
        with conn:
            conn.executescript(SCHEMA)
        save_header(
            p / HEADER,
            make_header(
                type="gallery",
                format_version=FORMAT_VERSION,
                params={},
                fingerprint=None,
                created=time.time(),
                galleria_version=__version__,
            ),
        )
        return cls(p, conn, readonly=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False) -> Gallery:
        p = Path(path)
        if not (p / HEADER).is_file():
            raise FormatError(f"{p} is not a galleria gallery (no {HEADER})")
        load_header(p / HEADER, type="gallery", format_version=FORMAT_VERSION)
        if not (p / DB).is_file():
            raise FormatError(f"{p / DB} is missing")
        conn = _connect(p / DB, readonly=readonly)
        return cls(p, conn, readonly=readonly)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str]) -> Gallery:
        p = Path(path)
        return cls.open(p) if (p / HEADER).exists() else cls.create(p)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, items={len(self)})"

    # -------------------------------------------------------------- settings
    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        self._check_writable()
        with self._tx() as c:
            c.execute(
                "INSERT INTO settings(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value)),
            )

    def delete_setting(self, key: str) -> None:
        self._check_writable()
        with self._tx() as c:
            c.execute("DELETE FROM settings WHERE key=?", (key,))

    @property
    def primary_space(self) -> str | None:
        """The space searched when none is named (the first one registered)."""
        return self.get_setting("primary_space")

    def set_primary_space(self, space: str) -> None:
        self.space_info(space)
        self.set_setting("primary_space", space)

    # ---------------------------------------------------------------- spaces
    def register_space(self, space: str, dim: int, info: dict[str, Any] | None = None) -> None:
        """Declare an embedding space (idempotent; a different dim is an error)."""
        self._check_writable()
        row = self._conn.execute("SELECT dim FROM spaces WHERE space=?", (space,)).fetchone()
        if row is not None:
            if int(row[0]) != int(dim):
                raise CompatibilityError(
                    f"space {space!r} has dimension {row[0]}, got vectors of dimension {dim}"
                )
            if info:
                with self._tx() as c:
                    c.execute("UPDATE spaces SET info=? WHERE space=?", (json.dumps(info), space))
            return
        with self._tx() as c:
            c.execute(
                "INSERT INTO spaces(space, slug, dim, info, created) VALUES(?, ?, ?, ?, ?)",
                (space, slug(space), int(dim), json.dumps(info or {}), time.time()),
            )
            if self._setting_in(c, "primary_space") is None:
                c.execute(
                    "INSERT INTO settings(key, value) VALUES('primary_space', ?)",
                    (json.dumps(space),),
                )

    def drop_space(self, space: str, *, force: bool = False) -> int:
        """Delete a space: its vectors (only with ``force`` when it still holds some),
        arrays, change log, failures, index and settings. Returns vectors deleted.

        Items left without any vector are deleted too. If ``space`` was the
        primary space, the oldest remaining space becomes primary.
        """
        self._check_writable()
        self.space_info(space)
        n = self.count(space)
        if n and not force:
            raise InputError(f"space {space!r} still holds {n} vectors (pass force=True)")
        with self._lock:
            with self._tx() as c:
                files = [r[0] for r in c.execute(
                    "SELECT file FROM segments WHERE space=?", (space,))]
                c.execute("DELETE FROM vectors WHERE space=?", (space,))
                c.execute("DELETE FROM segments WHERE space=?", (space,))
                c.execute("DELETE FROM log WHERE space=?", (space,))
                c.execute("DELETE FROM failures WHERE space=?", (space,))
                c.execute("DELETE FROM settings WHERE key IN (?, ?)",
                          (f"index_spec:{space}", f"index_params:{space}"))
                c.execute("DELETE FROM spaces WHERE space=?", (space,))
                c.execute("DELETE FROM items WHERE NOT EXISTS "
                          "(SELECT 1 FROM vectors v WHERE v.key = items.key)")
                if self._setting_in(c, "primary_space") == space:
                    row = c.execute("SELECT space FROM spaces ORDER BY created").fetchone()
                    if row is None:
                        c.execute("DELETE FROM settings WHERE key='primary_space'")
                    else:
                        c.execute("UPDATE settings SET value=? WHERE key='primary_space'",
                                  (json.dumps(row[0]),))
            self._indexes.pop(space, None)
            self._drop_saved_index(space)
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                (self.path / f).unlink()
        shutil.rmtree(self.path / "segments" / slug(space), ignore_errors=True)
        return n

    def spaces(self) -> list[SpaceInfo]:
        rows = self._conn.execute(
            "SELECT s.space, s.slug, s.dim, s.info, "
            "(SELECT COUNT(*) FROM vectors v WHERE v.space = s.space) "
            "FROM spaces s ORDER BY s.created"
        ).fetchall()
        return [SpaceInfo(r[0], r[1], int(r[2]), int(r[4]), json.loads(r[3])) for r in rows]

    def space_info(self, space: str | None = None) -> SpaceInfo:
        space = self._resolve_space(space)
        for s in self.spaces():
            if s.space == space:
                return s
        known = [s.space for s in self.spaces()]
        raise CompatibilityError(f"gallery {self.path} has no space {space!r}; it has {known}")

    def _resolve_space(self, space: str | None) -> str:
        if space is not None:
            return space
        primary = self.primary_space
        if primary is None:
            raise InputError(f"gallery {self.path} is empty: it has no embedding space yet")
        return primary

    # ----------------------------------------------------------------- items
    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def count(self, space: str | None = None) -> int:
        space = self._resolve_space(space)
        return int(
            self._conn.execute("SELECT COUNT(*) FROM vectors WHERE space=?", (space,)).fetchone()[0]
        )

    def ids(self, space: str | None = None) -> list[str]:
        """Item ids, in key order; with ``space``, only items that have a vector there."""
        if space is None:
            rows = self._conn.execute("SELECT id FROM items ORDER BY key")
        else:
            rows = self._conn.execute(
                "SELECT i.id FROM items i JOIN vectors v ON v.key = i.key "
                "WHERE v.space=? ORDER BY i.key",
                (space,),
            )
        return [r[0] for r in rows]

    def has(self, ids: Sequence[str], space: str) -> np.ndarray:
        """``(N,)`` bool: which ids already have a vector in ``space``."""
        present = set()
        for chunk in _chunks(list(ids), 500):
            q = ",".join("?" * len(chunk))
            present.update(
                r[0]
                for r in self._conn.execute(
                    f"SELECT i.id FROM items i JOIN vectors v ON v.key=i.key "
                    f"WHERE v.space=? AND i.id IN ({q})",
                    (space, *chunk),
                )
            )
        return np.array([i in present for i in ids], dtype=bool)

    def keys_of(self, ids: Sequence[str]) -> np.ndarray:
        """int64 keys of ids (-1 for unknown ids)."""
        found: dict[str, int] = {}
        for chunk in _chunks(list(ids), 500):
            q = ",".join("?" * len(chunk))
            found.update(
                self._conn.execute(f"SELECT id, key FROM items WHERE id IN ({q})", chunk).fetchall()
            )
        return np.array([found.get(i, MISSING_KEY) for i in ids], dtype=np.int64)

    def ids_of(self, keys: np.ndarray) -> np.ndarray:
        """Object array of ids for int64 keys, ``None`` for -1 or unknown keys (any shape)."""
        keys = np.asarray(keys, dtype=np.int64)
        uniq = [int(k) for k in np.unique(keys) if k != MISSING_KEY]
        found: dict[int, str] = {}
        for chunk in _chunks(uniq, 500):
            q = ",".join("?" * len(chunk))
            found.update(
                self._conn.execute(
                    f"SELECT key, id FROM items WHERE key IN ({q})", chunk
                ).fetchall()
            )
        out = np.empty(keys.shape, dtype=object)
        flat = out.reshape(-1)
        for n, k in enumerate(keys.reshape(-1)):
            flat[n] = found.get(int(k))
        return out

    def meta(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(list(ids), 500):
            q = ",".join("?" * len(chunk))
            for i, m in self._conn.execute(f"SELECT id, meta FROM items WHERE id IN ({q})", chunk):
                found[i] = json.loads(m)
        return [found.get(i) for i in ids]

    # --------------------------------------------------------------- vectors
    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        space: str,
        meta: Sequence[dict[str, Any] | None] | None = None,
        info: dict[str, Any] | None = None,
        replace: bool = False,
        drop_spaces: Sequence[str] = (),
    ) -> np.ndarray:
        """Store ``(N, D)`` vectors of ``space`` for ``ids``; returns their int64 keys.

        Args:
            ids: stable item ids (new items are created).
            vectors: L2-normalised embeddings made by the model ``space`` names.
            space: the model fingerprint of the vectors.
            meta: per-item metadata (stored for new items, merged for existing).
            info: model description recorded with a new space.
            replace: overwrite an existing vector of (item, space); otherwise
                that is an error.
            drop_spaces: in the same transaction, delete the items' vectors in
                these spaces (an upgrade moves items between spaces this way, so an
                item is never in both and never in neither).
        """
        self._check_writable()
        ids = [str(i) for i in ids]
        if not ids:
            raise InputError("add() needs at least one id")
        if len(set(ids)) != len(ids):
            raise InputError("add() got duplicate ids in one call")
        x = as_embeddings(vectors, name="vectors")
        if x.shape[0] != len(ids):
            raise InputError(f"{len(ids)} ids but {x.shape[0]} vectors")
        if meta is not None and len(meta) != len(ids):
            raise InputError(f"{len(ids)} ids but {len(meta)} metadata entries")
        self.register_space(space, x.shape[1], info)
        with self._lock:
            seg_file = self._new_segment_file(space)
            write_npy(self.path / seg_file, x)
            try:
                with self._tx() as c:
                    keys = self._upsert_items(c, ids, meta)
                    cur = c.execute(
                        "INSERT INTO segments(space, file, n) VALUES(?, ?, ?)",
                        (space, seg_file, len(ids)),
                    )
                    seg = int(cur.lastrowid or 0)
                    existing = self._existing(c, keys, space)
                    if existing and not replace:
                        names = [ids[n] for n, k in enumerate(keys) if int(k) in existing][:5]
                        raise InputError(
                            f"{len(existing)} items already have a vector in {space!r} "
                            f"(e.g. {names}); pass replace=True to overwrite"
                        )
                    if existing:
                        c.executemany(
                            "INSERT INTO log(space, op, key) VALUES(?, 'del', ?)",
                            [(space, k) for k in existing],
                        )
                    c.executemany(
                        "INSERT OR REPLACE INTO vectors(key, space, segment, row) "
                        "VALUES(?, ?, ?, ?)",
                        [(int(k), space, seg, n) for n, k in enumerate(keys)],
                    )
                    c.executemany(
                        "INSERT INTO log(space, op, key) VALUES(?, 'add', ?)",
                        [(space, int(k)) for k in keys],
                    )
                    for other in drop_spaces:
                        if other == space:
                            raise InputError("drop_spaces must not contain the target space")
                        self._delete_vectors(c, keys, other)
                    c.executemany(
                        "DELETE FROM failures WHERE id=? AND space=?", [(i, space) for i in ids]
                    )
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / seg_file).unlink()
                raise
        self._maybe_compact(space)
        return keys

    def remove(self, ids: Sequence[str], *, space: str | None = None) -> int:
        """Remove items (all their vectors), or only their vectors in ``space``.

        Returns how many (item, space) vectors were deleted. Items left with no
        vector are deleted. Unknown ids are ignored.
        """
        self._check_writable()
        keys = [int(k) for k in self.keys_of(list(ids)) if k != MISSING_KEY]
        if not keys:
            return 0
        spaces = [space] if space is not None else [s.space for s in self.spaces()]
        removed = 0
        with self._lock, self._tx() as c:
            for sp in spaces:
                removed += self._delete_vectors(c, np.array(keys), sp)
            for chunk in _chunks(keys, 500):
                q = ",".join("?" * len(chunk))
                c.execute(
                    f"DELETE FROM items WHERE key IN ({q}) AND NOT EXISTS "
                    f"(SELECT 1 FROM vectors v WHERE v.key = items.key)",
                    chunk,
                )
        return removed

    def get_vectors(self, keys: np.ndarray, *, space: str | None = None) -> np.ndarray:
        """``(N, D)`` vectors of int64 keys in ``space`` (error for a key without one)."""
        try:
            return self._get_vectors(keys, space)
        except FileNotFoundError:  # a concurrent compaction replaced an array: read again
            return self._get_vectors(keys, space)

    def _get_vectors(self, keys: np.ndarray, space: str | None) -> np.ndarray:
        space = self._resolve_space(space)
        dim = self.space_info(space).dim
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        loc: dict[int, tuple[str, int]] = {}
        for chunk in _chunks([int(k) for k in keys], 500):
            q = ",".join("?" * len(chunk))
            for k, f, r in self._conn.execute(
                f"SELECT v.key, s.file, v.row FROM vectors v JOIN segments s "
                f"ON s.segment = v.segment WHERE v.space=? AND v.key IN ({q})",
                (space, *chunk),
            ):
                loc[int(k)] = (f, int(r))
        missing = [int(k) for k in keys if int(k) not in loc]
        if missing:
            raise InputError(f"{len(missing)} keys have no vector in {space!r}: {missing[:5]}")
        out = np.empty((len(keys), dim), dtype=np.float32)
        cache: dict[str, np.ndarray] = {}
        for n, k in enumerate(keys):
            f, r = loc[int(k)]
            if f not in cache:
                cache[f] = np.load(self.path / f, mmap_mode="r")
            out[n] = cache[f][r]
        return out

    def iter_vectors(
        self, space: str | None = None, *, batch: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(keys (n,), vectors (n, D))`` of every item in ``space``, by segment."""
        space = self._resolve_space(space)
        segs = self._conn.execute(
            "SELECT segment, file FROM segments WHERE space=? ORDER BY segment", (space,)
        ).fetchall()
        keys_buf: list[np.ndarray] = []
        vec_buf: list[np.ndarray] = []
        size = 0
        for seg, f in segs:
            rows = np.array(
                self._conn.execute(
                    "SELECT key, row FROM vectors WHERE segment=? ORDER BY row", (seg,)
                ).fetchall(),
                dtype=np.int64,
            ).reshape(-1, 2)
            if not len(rows):
                continue
            arr = np.load(self.path / f, mmap_mode="r")
            keys_buf.append(rows[:, 0])
            vec_buf.append(np.asarray(arr[rows[:, 1]], dtype=np.float32))
            size += len(rows)
            if size >= batch:
                yield np.concatenate(keys_buf), np.concatenate(vec_buf)
                keys_buf, vec_buf, size = [], [], 0
        if size:
            yield np.concatenate(keys_buf), np.concatenate(vec_buf)

    def load_vectors(self, space: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ``(keys (N,), vectors (N, D))`` of ``space`` (sorted by key)."""
        space = self._resolve_space(space)
        dim = self.space_info(space).dim
        parts = list(self.iter_vectors(space))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        keys = np.concatenate([p[0] for p in parts])
        vecs = np.concatenate([p[1] for p in parts])
        order = np.argsort(keys, kind="stable")
        return keys[order], vecs[order]

    # -------------------------------------------------------------- failures
    def record_failures(self, space: str, failures: Sequence[Failure]) -> None:
        self._check_writable()
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO failures(id, space, path, reason, at) VALUES(?,?,?,?,?)",
                [(f.id, space, f.path, f.reason, time.time()) for f in failures],
            )

    def failures(self, space: str | None = None) -> list[Failure]:
        space = self._resolve_space(space)
        return [
            Failure(*r)
            for r in self._conn.execute(
                "SELECT id, path, reason FROM failures WHERE space=? ORDER BY id", (space,)
            )
        ]

    # --------------------------------------------------------------- indexes
    def index_spec(self, space: str | None = None) -> str:
        space = self._resolve_space(space)
        return str(self.get_setting(f"index_spec:{space}", "exact"))

    def set_index_spec(self, spec: str, space: str | None = None, **params: Any) -> None:
        """Choose the index of a space (``exact`` or a FAISS factory string)."""
        space = self._resolve_space(space)
        from galleria.index.factory import create_index

        create_index(spec, self.space_info(space).dim, **params)  # validate early
        self.set_setting(f"index_spec:{space}", spec)
        self.set_setting(f"index_params:{space}", params)
        with self._lock:
            self._indexes.pop(space, None)
        self._drop_saved_index(space)

    def generation(self, space: str) -> int:
        row = self._conn.execute("SELECT MAX(gen) FROM log WHERE space=?", (space,)).fetchone()
        return int(row[0] or 0)

    def index(self, space: str | None = None) -> Any:
        """The live index of ``space``, loaded or built, and brought up to date."""
        space = self._resolve_space(space)
        with self._lock:
            idx = self._indexes.get(space)
            if idx is None:
                idx = self._load_saved_index(space)
            idx = self._build_index(space) if idx is None else self._catch_up(space, idx)
            self._indexes[space] = idx
            return idx

    def build_index(self, space: str | None = None, *, save: bool = True) -> Any:
        """Rebuild the index of ``space`` from all its vectors (and save it)."""
        space = self._resolve_space(space)
        with self._lock:
            idx = self._build_index(space)
            self._indexes[space] = idx
            if save and not self.readonly:
                self.save_index(space)
            return idx

    def save_index(self, space: str | None = None) -> Path:
        """Write the live index of ``space`` to a new folder, then point CURRENT at it."""
        self._check_writable()
        space = self._resolve_space(space)
        with self._lock:
            idx = self.index(space)
            base = self._index_root(space)
            name = f"{idx.type_name}-g{idx.generation}-{uuid.uuid4().hex[:8]}"
            idx.save(base / name)
            write_json(base / "CURRENT", {"folder": name, "generation": idx.generation})
            for old in base.iterdir():
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
            return base / name

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        space: str | None = None,
        fingerprint: str | None = None,
        dim: int | None = None,
        funnel: tuple[int, int] | None = None,
    ) -> SearchResult:
        """Top-``k`` items for ``(Q, D)`` query vectors in ``space`` -> string ids.

        ``fingerprint``: the model that made the queries; it must be the space's
        (a CompatibilityError names both otherwise). ``dim`` searches the first
        ``dim`` coordinates; ``funnel=(shortlist_dim, shortlist)`` shortlists with a
        small prefix and re-scores with the full vectors. Both need a ``prefix``
        index (nested embeddings: ss2d, matryoshka, pca).
        """
        space = self._resolve_space(space if space is not None else fingerprint)
        info = self.space_info(space)
        if fingerprint is not None and fingerprint != space:
            raise CompatibilityError(
                f"query vectors come from model {fingerprint!r} but the gallery space "
                f"searched holds vectors of {space!r}"
            )
        q = np.asarray(queries)
        if (q.ndim == 2 and q.shape[1] != info.dim) or (q.ndim == 1 and q.shape[0] != info.dim):
            got = q.shape[-1]
            raise CompatibilityError(
                f"query vectors have dimension {got} but space {space!r} holds vectors "
                f"of dimension {info.dim}"
            )
        q = as_embeddings(q, name="queries", dim=info.dim)
        if k <= 0:
            raise InputError(f"k must be positive, got {k}")
        idx = self.index(space)
        if dim is not None or funnel is not None:
            if not hasattr(idx, "funnel_search"):
                raise InputError(
                    f"the index of {space!r} is {self.index_spec(space)!r}; prefix and funnel "
                    "search need a 'prefix' index (galleria index ... --index prefix)"
                )
            if funnel is not None:
                res = idx.funnel_search(q, k, shortlist_dim=funnel[0], shortlist=funnel[1],
                                        rescore_dim=dim)
            else:
                res = idx.search(q, k, dim=dim)
        else:
            res = idx.search(q, k)
        return SearchResult(res.scores, self.ids_of(res.ids))

    # --------------------------------------------------------------- upkeep
    def compact(self, space: str | None = None, *, orphan_age_s: float = 600.0) -> int:
        """Merge small vector arrays and delete orphaned ones; returns files removed.

        An orphan is an array no committed row refers to (left by a crash between
        writing it and committing); only orphans older than ``orphan_age_s`` are
        deleted, so a concurrent writer's fresh array is never touched.
        """
        self._check_writable()
        spaces = [space] if space else [s.space for s in self.spaces()]
        removed = 0
        for sp in spaces:
            removed += self._compact_space(sp)
        removed += self._delete_orphans(orphan_age_s)
        return removed

    # ------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _check_writable(self) -> None:
        if self.readonly:
            raise InputError(f"gallery {self.path} is open read-only")

    @staticmethod
    def _setting_in(c: sqlite3.Connection, key: str) -> Any:
        row = c.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def _new_segment_file(self, space: str) -> str:
        folder = Path("segments") / slug(space)
        (self.path / folder).mkdir(parents=True, exist_ok=True)
        return (folder / f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}.npy").as_posix()

    def _upsert_items(
        self,
        c: sqlite3.Connection,
        ids: list[str],
        meta: Sequence[dict[str, Any] | None] | None,
    ) -> np.ndarray:
        now = time.time()
        c.executemany(
            "INSERT OR IGNORE INTO items(id, meta, added) VALUES(?, ?, ?)",
            [(i, json.dumps((meta[n] if meta else None) or {}), now) for n, i in enumerate(ids)],
        )
        if meta is not None:
            for n, i in enumerate(ids):
                if meta[n]:
                    old = json.loads(
                        c.execute("SELECT meta FROM items WHERE id=?", (i,)).fetchone()[0]
                    )
                    old.update(meta[n])  # type: ignore[arg-type]
                    c.execute("UPDATE items SET meta=? WHERE id=?", (json.dumps(old), i))
        found: dict[str, int] = {}
        for chunk in _chunks(ids, 500):
            q = ",".join("?" * len(chunk))
            rows = c.execute(f"SELECT id, key FROM items WHERE id IN ({q})", chunk).fetchall()
            found.update(rows)
        return np.array([found[i] for i in ids], dtype=np.int64)

    @staticmethod
    def _existing(c: sqlite3.Connection, keys: np.ndarray, space: str) -> set[int]:
        out: set[int] = set()
        for chunk in _chunks([int(k) for k in keys], 500):
            q = ",".join("?" * len(chunk))
            out.update(
                r[0]
                for r in c.execute(
                    f"SELECT key FROM vectors WHERE space=? AND key IN ({q})", (space, *chunk)
                )
            )
        return out

    def _delete_vectors(self, c: sqlite3.Connection, keys: np.ndarray, space: str) -> int:
        existing = self._existing(c, keys, space)
        if not existing:
            return 0
        ks = sorted(existing)
        for chunk in _chunks(ks, 500):
            q = ",".join("?" * len(chunk))
            c.execute(f"DELETE FROM vectors WHERE space=? AND key IN ({q})", (space, *chunk))
        c.executemany(
            "INSERT INTO log(space, op, key) VALUES(?, 'del', ?)", [(space, k) for k in ks]
        )
        return len(ks)

    def _maybe_compact(self, space: str) -> None:
        n = self._conn.execute("SELECT COUNT(*) FROM segments WHERE space=?", (space,)).fetchone()
        if int(n[0]) > COMPACT_SEGMENTS:
            self._compact_space(space)

    def _compact_space(self, space: str) -> int:
        with self._lock:
            dropped = self._drop_empty_segments(space)
            segs = self._conn.execute(
                "SELECT segment, file FROM segments WHERE space=? AND n<? ORDER BY segment",
                (space, LARGE_SEGMENT),
            ).fetchall()
            if len(segs) <= 1:
                return dropped
            removed_files = [f for _, f in segs]
            old = [s for s, _ in segs]
            new_file = self._new_segment_file(space)
            # read and rewrite under the write lock: no concurrent move/replace can race
            with self._tx() as c:
                keys, vecs = self._segment_vectors(old)
                if len(keys):
                    write_npy(self.path / new_file, vecs)
                    seg = int(
                        c.execute(
                            "INSERT INTO segments(space, file, n) VALUES(?, ?, ?)",
                            (space, new_file, len(keys)),
                        ).lastrowid
                        or 0
                    )
                    c.executemany(
                        "UPDATE vectors SET segment=?, row=? WHERE key=? AND space=?",
                        [(seg, n, int(k), space) for n, k in enumerate(keys)],
                    )
                    c.execute(
                        f"DELETE FROM segments WHERE segment IN ({','.join('?' * len(old))})",
                        old,
                    )
                c.execute(
                    "DELETE FROM segments WHERE space=? AND segment NOT IN "
                    "(SELECT DISTINCT segment FROM vectors WHERE space=?)",
                    (space, space),
                )
            for f in removed_files:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / f).unlink()
            return dropped + len(removed_files)

    def _segment_vectors(self, segments: list[int]) -> tuple[np.ndarray, np.ndarray]:
        keys: list[np.ndarray] = []
        vecs: list[np.ndarray] = []
        for seg in segments:
            f = self._conn.execute("SELECT file FROM segments WHERE segment=?", (seg,)).fetchone()
            rows = np.array(
                self._conn.execute(
                    "SELECT key, row FROM vectors WHERE segment=? ORDER BY row", (seg,)
                ).fetchall(),
                dtype=np.int64,
            ).reshape(-1, 2)
            if len(rows):
                arr = np.load(self.path / f[0], mmap_mode="r")
                keys.append(rows[:, 0])
                vecs.append(np.asarray(arr[rows[:, 1]], dtype=np.float32))
        if not keys:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return np.concatenate(keys), np.concatenate(vecs)

    def _drop_empty_segments(self, space: str) -> int:
        with self._tx() as c:
            rows = c.execute(
                "SELECT segment, file FROM segments WHERE space=? AND segment NOT IN "
                "(SELECT DISTINCT segment FROM vectors WHERE space=?)",
                (space, space),
            ).fetchall()
            c.executemany("DELETE FROM segments WHERE segment=?", [(r[0],) for r in rows])
        for _, f in rows:
            with contextlib.suppress(FileNotFoundError):
                (self.path / f).unlink()
        return len(rows)

    def _delete_orphans(self, min_age_s: float = 0.0) -> int:
        known = {r[0] for r in self._conn.execute("SELECT file FROM segments")}
        removed = 0
        root = self.path / "segments"
        if not root.is_dir():
            return 0
        now = time.time()
        for f in root.rglob("*"):
            if not f.is_file():
                continue
            rel = f.relative_to(self.path).as_posix()
            if rel in known:
                continue
            if now - f.stat().st_mtime < min_age_s:
                continue
            f.unlink()
            removed += 1
        return removed

    def _index_root(self, space: str) -> Path:
        return self.path / "indexes" / slug(space)

    def _drop_saved_index(self, space: str) -> None:
        shutil.rmtree(self._index_root(space), ignore_errors=True)

    def _load_saved_index(self, space: str) -> Any:
        from galleria.index.factory import load_index

        cur = self._index_root(space) / "CURRENT"
        if not cur.is_file():
            return None
        try:
            folder = self._index_root(space) / read_json(cur)["folder"]
            return load_index(folder, fingerprint=space, dim=self.space_info(space).dim)
        except (FormatError, KeyError, ValueError, OSError) as exc:
            log.warning("index of %s unreadable (%s); rebuilding from the store", space, exc)
            return None

    def _build_index(self, space: str) -> Any:
        from galleria.index.factory import create_index

        info = self.space_info(space)
        params = self.get_setting(f"index_params:{space}", {}) or {}
        gen = self.generation(space)
        idx = create_index(self.index_spec(space), info.dim, fingerprint=space, **params)
        keys, vecs = self.load_vectors(space)
        if len(keys):
            idx.add(keys, vecs)
        idx.generation = gen
        return idx

    def _catch_up(self, space: str, idx: Any) -> Any:
        gen = self.generation(space)
        if idx.generation == gen:
            return idx
        if idx.generation > gen:
            log.warning("index of %s is ahead of the store; rebuilding", space)
            return self._build_index(space)
        rows = self._conn.execute(
            "SELECT op, key FROM log WHERE space=? AND gen>? ORDER BY gen",
            (space, idx.generation),
        ).fetchall()
        if len(rows) > max(1000, len(idx) // 2):
            return self._build_index(space)
        # net effect per key: the last op wins; deletes first, then adds
        last: dict[int, str] = {}
        for op, key in rows:
            last[int(key)] = op
        touched = np.array(sorted(last), dtype=np.int64)
        if len(touched):
            idx.remove(touched)
        adds = np.array([k for k, op in last.items() if op == "add"], dtype=np.int64)
        if len(adds):
            present = self._existing(self._conn, adds, space)
            adds = np.array(sorted(present), dtype=np.int64)
            if len(adds):
                idx.add(adds, self.get_vectors(adds, space=space))
        idx.generation = gen
        return idx


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _chunks(seq: Sequence[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield list(seq[i : i + n])
