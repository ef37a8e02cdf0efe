"""A gallery on disk: items keyed by stable string ids, their data in one or more
spaces (one per model fingerprint; global vectors or per-item local features),
and a search index per space.

Layout of a gallery folder::

    gallery.json             header {type: gallery, format_version, ...}
    gallery.sqlite           items, spaces, segments, change log, snapshots, failures
    gallery.sqlite.backup    copy of the database after the last finished job
    write.lock               the writer lock (see store/lock.py)
    segments/<space>/*.npy   immutable data arrays (checksummed in the database)
    indexes/<space>/<name>/  saved index snapshots (checksummed in the database)

Readers never see a half-written state: data files are complete before the
transaction that references them commits; a reader searches an immutable
:class:`~galleria.store.views.SpaceView` and picks up newer commits on its next
search (one indexed read tells it the generation changed). Writers serialise on
the writer lock (store/writes.py). Damage to any file is detected from the
sizes and SHA-256 sums in the database: ``galleria check`` / ``galleria repair``
(store/integrity.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.fingerprint import slug
from galleria.io.artifact import load_header, make_header, save_header
from galleria.store import filtered, items, listing, payloads, reader, writes
from galleria.store.db import Database
from galleria.store.lock import WriterLock
from galleria.store.schema import DB, FORMAT_VERSION, HEADER, SCHEMA
from galleria.store.state import GalleryState, read_state
from galleria.store.views import KeyFilter, SpaceView
from galleria.types import LocalFeatures, SearchResult, clamp_k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpaceInfo:
    """One space of a gallery."""

    space: str
    slug: str
    dim: int
    count: int
    info: dict[str, Any]
    kind: str = "global"


@dataclass(frozen=True)
class Failure:
    id: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "path": self.path, "reason": self.reason}


class Gallery:
    """Open with :meth:`create`, :meth:`open` or :meth:`open_or_create`.

    One object may be shared by the threads of a process: each thread gets its
    own database connection, writes serialise on the writer lock and searches
    run on immutable views.
    """

    def __init__(self, path: Path, db: Database, *, readonly: bool) -> None:
        self.path = path
        self.db = db
        self.readonly = readonly
        self.writer_lock = WriterLock(path)
        self._views: dict[str, SpaceView] = {}
        self._refresh_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.payload_cache = payloads.PayloadCache()
        self.filter_sources = filtered.SourceCache()
        if not readonly:
            payloads.ensure_on(db)

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

        db = Database(p / DB)
        db.conn().executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
        save_header(p / HEADER, make_header(
            type="gallery", format_version=FORMAT_VERSION, params={}, fingerprint=None,
            created=time.time(), galleria_version=__version__))
        return cls(p, db, readonly=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False) -> Gallery:
        p = Path(path)
        if not (p / HEADER).is_file():
            raise FormatError(f"{p} is not a galleria gallery (no {HEADER})")
        header = load_header(p / HEADER, type="gallery", format_version=FORMAT_VERSION)
        del header
        if not (p / DB).is_file():
            raise FormatError(f"{p / DB} is missing; run `galleria repair {p}` to restore "
                              "it from its backup")
        if (p / DB).stat().st_size == 0:
            raise FormatError(f"{p / DB} is empty (damaged); run `galleria repair {p}`")
        db = Database(p / DB, readonly=readonly)
        if db.one("SELECT name FROM sqlite_master WHERE type='table' AND name='spaces'") is None:
            db.close()
            raise FormatError(f"{p / DB} holds no gallery tables (damaged); run "
                              f"`galleria repair {p}`")
        return cls(p, db, readonly=readonly)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str]) -> Gallery:
        """Open ``path``, or create it; safe when several processes race to create it."""
        p = Path(path)
        if (p / HEADER).exists():
            return cls.open(p)
        if p.exists() and not p.is_dir():
            raise InputError(f"{p} exists and is not a folder")
        p.mkdir(parents=True, exist_ok=True)
        with WriterLock(p).hold():  # the first process creates, the others open
            return cls.open(p) if (p / HEADER).exists() else cls.create(p)

    def close(self) -> None:
        self.db.close()
        self._views.clear()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Gallery({str(self.path)!r}, items={len(self)})"

    # -------------------------------------------------------------- settings
    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self.db.one("SELECT value FROM settings WHERE key=?", (key,))
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        self._check_writable()
        with self.db.write() as c:
            c.execute("INSERT INTO settings(key, value) VALUES(?, ?) "
                      "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, json.dumps(value)))

    def delete_setting(self, key: str) -> None:
        self._check_writable()
        with self.db.write() as c:
            c.execute("DELETE FROM settings WHERE key=?", (key,))

    def update_settings(self, values: dict[str, Any] | None = None,
                        delete: Sequence[str] = ()) -> None:
        """Set ``values`` and delete ``delete`` in ONE transaction (readers see all or none)."""
        self._check_writable()
        if "primary_space" in (values or {}):
            self.space_info((values or {})["primary_space"])
        with self.db.write() as c:
            for k, v in (values or {}).items():
                c.execute("INSERT INTO settings(key, value) VALUES(?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                          (k, json.dumps(v)))
            for k in delete:
                c.execute("DELETE FROM settings WHERE key=?", (k,))

    def state(self) -> GalleryState:
        """Spaces, primary space and settings at one committed state (one read)."""
        with self.db.read() as c:
            return read_state(c, self.path)

    @property
    def primary_space(self) -> str | None:
        """The space searched when none is named (the first one registered)."""
        return self.get_setting("primary_space")

    def set_primary_space(self, space: str) -> None:
        self.space_info(space)
        self.set_setting("primary_space", space)

    # ---------------------------------------------------------------- spaces
    def register_space(self, space: str, dim: int, info: dict[str, Any] | None = None, *,
                       kind: str = "global") -> None:
        """Declare a space (idempotent; another dim or kind is an error).

        ``info`` records how its data is made (``{"config": extractor.config(), ...}``;
        local spaces also ``descriptor_dtype``). ``kind``: ``global`` or ``local``.
        """
        self._check_writable()
        if kind not in ("global", "local"):
            raise InputError(f"kind must be global or local, not {kind!r}")
        if isinstance(dim, bool) or int(dim) <= 0:
            raise InputError(f"dim must be a positive integer; got {dim!r}")
        with self.db.write() as c:
            row = c.execute("SELECT dim, kind FROM spaces WHERE space=?", (space,)).fetchone()
            if row is not None:
                if int(row[0]) != int(dim) or row[1] != kind:
                    raise CompatibilityError(
                        f"space {space!r} holds {row[1]} data of dimension {row[0]}; got {kind} "
                        f"data of dimension {dim}")
                if info:
                    c.execute("UPDATE spaces SET info=? WHERE space=?", (json.dumps(info), space))
                return
            c.execute("INSERT INTO spaces(space, slug, dim, kind, info, created) "
                      "VALUES(?, ?, ?, ?, ?, ?)",
                      (space, slug(space), int(dim), kind, json.dumps(info or {}), time.time()))
            if kind == "global" and c.execute(
                    "SELECT 1 FROM settings WHERE key='primary_space'").fetchone() is None:
                c.execute("INSERT INTO settings(key, value) VALUES('primary_space', ?)",
                          (json.dumps(space),))

    def update_space_info(self, space: str, **fields: Any) -> None:
        """Merge ``fields`` into the space's recorded info."""
        info = {**self.space_info(space).info, **fields}
        with self.db.write() as c:
            c.execute("UPDATE spaces SET info=? WHERE space=?", (json.dumps(info), space))

    def drop_space(self, space: str, *, force: bool = False) -> int:
        """Delete a space with its data (only with ``force`` when it still holds some),
        index snapshot and settings. Items left without data are deleted. If ``space``
        was primary, the oldest remaining global space becomes primary.
        """
        from galleria.store.integrity import drop_space

        self._check_writable()
        return drop_space(self, space, force=force)

    def spaces(self) -> list[SpaceInfo]:
        rows = self.db.all("SELECT space, slug, dim, count, info, kind FROM spaces "
                           "ORDER BY created")
        return [SpaceInfo(r[0], r[1], int(r[2]), int(r[3]), json.loads(r[4]), r[5]) for r in rows]

    def space_info(self, space: str | None = None) -> SpaceInfo:
        space = self._resolve_space(space)
        r = self.db.one("SELECT space, slug, dim, count, info, kind FROM spaces WHERE space=?",
                        (space,))
        if r is None:
            known = [s.space for s in self.spaces()]
            raise CompatibilityError(f"gallery {self.path} has no space {space!r}; it has {known}")
        return SpaceInfo(r[0], r[1], int(r[2]), int(r[3]), json.loads(r[4]), r[5])

    def has_space(self, space: str) -> bool:
        return self.db.one("SELECT 1 FROM spaces WHERE space=?", (space,)) is not None

    def _resolve_space(self, space: str | None) -> str:
        if space is not None:
            return space
        primary = self.primary_space
        if primary is None:
            raise InputError(f"gallery {self.path} is empty: it has no embedding space yet")
        return primary

    # ----------------------------------------------------------------- items
    def __len__(self) -> int:
        return int(self.db.one("SELECT COUNT(*) FROM items")[0])  # type: ignore[index]

    def count(self, space: str | None = None) -> int:
        """Items with data in ``space`` (kept in the space row: no scan)."""
        return self.space_info(space).count

    def generation(self, space: str) -> int:
        r = self.db.one("SELECT generation FROM spaces WHERE space=?", (space,))
        return int(r[0]) if r else 0

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[items.Snapshot]:
        """Lookups at one committed state: ``with g.snapshot() as s: s.item(id) ...``."""
        with self.db.read() as c:
            yield items.Snapshot(c, self.path)

    def ids(self, space: str | None = None) -> list[str]:
        """Item ids in key order; with ``space``, only items that have data there."""
        with self.db.read() as c:
            return items.ids(c, space)

    def item(self, item_id: str) -> items.ItemRecord | None:
        """An item's key, metadata, content hash and spaces (``None`` if unknown)."""
        with self.db.read() as c:
            return items.item(c, item_id, self.path)

    def has(self, ids: Sequence[str], space: str) -> np.ndarray:
        """``(N,)`` bool: which ids already have data in ``space``."""
        with self.db.read() as c:
            return items.has(c, ids, space)

    def keys_of(self, ids: Sequence[str]) -> np.ndarray:
        """int64 keys of ids (-1 for unknown ids)."""
        with self.db.read() as c:
            return items.keys_of(c, ids)

    def ids_of(self, keys: np.ndarray) -> np.ndarray:
        """Object array of ids for int64 keys, ``None`` for -1 or unknown keys (any shape)."""
        with self.db.read() as c:
            return items.ids_of(c, keys)

    def meta(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Items' metadata (``None`` for unknown ids); ``path``, the item's image, is
        absolute (a path recorded relative to the gallery is resolved against it)."""
        with self.db.read() as c:
            return items.metas(c, ids, self.path)

    def contents(self, ids: Sequence[str]) -> dict[str, tuple[str | None, int | None, int | None]]:
        """``id -> (content hash, file size, mtime_ns)`` recorded for known ids."""
        with self.db.read() as c:
            return items.contents(c, ids)

    # ------------------------------------------------------------------ writes
    def add(self, ids: Sequence[str], vectors: np.ndarray, *, space: str,
            meta: Sequence[dict[str, Any] | None] | None = None,
            info: dict[str, Any] | None = None, replace: bool = False,
            drop_spaces: Sequence[str] = (), only_if_in: str | None = None,
            contents: Sequence[writes.Content | None] | None = None) -> np.ndarray:
        """Store ``(N, D)`` vectors of ``space`` for ``ids``; returns their int64 keys.

        Args:
            ids: stable item ids (strings; new items are created).
            vectors: finite, L2-normalised embeddings made by the model ``space`` names.
            space: the model fingerprint (registered on first use with ``info``).
            meta: per-item metadata (merged into what is stored).
            replace: overwrite existing data of (item, space); otherwise an error.
            drop_spaces: in the same transaction, delete the items' data in these
                spaces (an upgrade moves items this way: never in both, never in neither).
            only_if_in: skip items that no longer have data in that space (key -1).
            contents: per item ``(content hash, file size, mtime_ns)`` of its image.
        """
        self._check_writable()
        x = np.asarray(vectors)
        if not self.has_space(space):
            if x.ndim != 2:
                raise InputError(f"vectors must have shape (N, D); got shape {x.shape}")
            self.register_space(space, x.shape[1], info)
        return writes.add_vectors(self, ids, vectors, space=space, meta=meta, contents=contents,
                                  rules=writes.AddRules(replace, drop_spaces, only_if_in))

    def add_local(self, ids: Sequence[str], features: Sequence[LocalFeatures], *, space: str,
                  meta: Sequence[dict[str, Any] | None] | None = None, replace: bool = False,
                  contents: Sequence[writes.Content | None] | None = None,
                  drop_spaces: Sequence[str] = (), only_if_in: str | None = None) -> np.ndarray:
        """Store per-item local features (one :class:`LocalFeatures` per id) of a local space."""
        self._check_writable()
        return writes.add_local(self, ids, features, space=space, meta=meta, contents=contents,
                                rules=writes.AddRules(replace, drop_spaces, only_if_in))

    def remove(self, ids: Sequence[str], *, space: str | None = None) -> int:
        """Remove items (all their data), or only their data in ``space``.

        Returns how many (item, space) entries were deleted; unknown ids are ignored.
        """
        self._check_writable()
        return writes.remove(self, ids, space=space)

    def compact(self, space: str | None = None, *, orphan_age_s: float = 600.0) -> int:
        """Merge small segment files; retired files past their grace period and files a
        crash left unreferenced (older than ``orphan_age_s``) are deleted."""
        self._check_writable()
        n = 0
        for sp in ([space] if space else [s.space for s in self.spaces()]):
            n += writes.compact_space(self, sp)
        return n + writes.sweep(self, orphan_age_s=orphan_age_s)

    def record_failures(self, space: str, failures: Sequence[Failure]) -> None:
        self._check_writable()
        with self.db.write() as c:
            c.executemany(
                "INSERT OR REPLACE INTO failures(id, space, path, reason, at) VALUES(?,?,?,?,?)",
                [(f.id, space, f.path, f.reason, time.time()) for f in failures])

    def clear_failures(self, space: str, ids: Sequence[str] | None = None) -> int:
        """Forget failures of ``space`` (all, or of ``ids``); returns how many."""
        self._check_writable()
        with self.db.write() as c:
            if ids is None:
                return c.execute("DELETE FROM failures WHERE space=?", (space,)).rowcount
            return sum(c.execute("DELETE FROM failures WHERE space=? AND id=?", (space, i)
                                 ).rowcount for i in ids)

    def failures(self, space: str | None = None) -> list[Failure]:
        space = self._resolve_space(space)
        return [Failure(*r) for r in self.db.all(
            "SELECT id, path, reason FROM failures WHERE space=? ORDER BY id", (space,))]

    # ------------------------------------------------------------------- reads
    def get_vectors(self, keys: np.ndarray, *, space: str | None = None) -> np.ndarray:
        """``(N, D)`` vectors of int64 keys in a global space (error for a key without one)."""
        space = self._resolve_space(space)
        with self.db.read() as c:
            row = reader.space_row(c, space, self.path)
            if row.kind != "global":
                raise InputError(f"space {space!r} holds local features: use get_local")
            return reader.fetch(c, self.path, row, np.asarray(keys))

    def get_local(self, keys: np.ndarray, *, space: str) -> list[LocalFeatures]:
        """Local features of int64 keys in a local space, in the order of ``keys``."""
        with self.db.read() as c:
            row = reader.space_row(c, space, self.path)
            if row.kind != "local":
                raise InputError(f"space {space!r} holds global vectors: use get_vectors")
            return reader.fetch(c, self.path, row, np.asarray(keys))  # type: ignore[no-any-return]

    def load_vectors(self, space: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ``(keys (N,), vectors (N, D))`` of a global space (sorted by key), verified."""
        space = self._resolve_space(space)
        with self.db.read() as c:
            row = reader.space_row(c, space, self.path)
            if row.kind != "global":
                raise InputError(f"space {space!r} holds local features: use iter_local")
            return reader.load_space(c, self.path, row)  # type: ignore[no-any-return]

    def iter_vectors(self, space: str | None = None, *, batch: int = 65536
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(keys (n,), vectors (n, D))`` batches of every item of a global space, from one
        consistent snapshot (read once, then yielded in key order)."""
        keys, vecs = self.load_vectors(space)
        for s in range(0, len(keys), batch):
            yield keys[s : s + batch], vecs[s : s + batch]

    def iter_local(self, space: str, *, batch: int = 4096
                   ) -> Iterator[tuple[np.ndarray, list[LocalFeatures]]]:
        """``(keys (n,), features)`` batches of every item of a local space, one snapshot."""
        with self.db.read() as c:
            row = reader.space_row(c, space, self.path)
            if row.kind != "local":
                raise InputError(f"space {space!r} holds global vectors: use iter_vectors")
            keys = np.array([r[0] for r in c.execute(
                "SELECT key FROM vectors WHERE space=? ORDER BY key", (space,))], np.int64)
            for s in range(0, len(keys), batch):
                yield keys[s : s + batch], reader.fetch(c, self.path, row, keys[s : s + batch])

    # ------------------------------------------------------------ indexes/views
    def index_spec(self, space: str | None = None) -> str:
        space = self._resolve_space(space)
        r = self.db.one("SELECT index_spec FROM spaces WHERE space=?", (space,))
        if r is None:
            raise CompatibilityError(f"gallery {self.path} has no space {space!r}")
        return str(r[0])

    def set_index_spec(self, spec: str, space: str | None = None, **params: Any) -> None:
        """Choose the index of a space (``exact``, ``exact-bf16``, ``prefix``, FAISS ...)."""
        self._check_writable()
        space = self._resolve_space(space)
        info = self.space_info(space)
        if info.kind == "local":
            from galleria.local.factory import create_local_index, local_index_kind

            create_local_index(local_index_kind(spec), info.dim, **params)  # validate early
        else:
            from galleria.index.factory import create_index

            create_index(spec, info.dim, **params)  # validate early
        with self.db.write() as c:
            c.execute("UPDATE spaces SET index_spec=?, index_params=? WHERE space=?",
                      (spec, json.dumps(params), space))

    def view(self, space: str | None = None, *, refresh: bool = True) -> SpaceView:
        """The current view of ``space`` (refreshed to the latest commit unless told not to)."""
        space = self._resolve_space(space)
        cur = self._views.get(space)
        if cur is not None and not refresh:
            return cur
        return self.refresh(space)

    def refresh(self, space: str | None = None, *, merge: bool = False) -> SpaceView:
        """Bring the view of ``space`` to the latest commit (on a copy; one swap).

        Cheap when nothing changed (one indexed read). Threads refreshing the same
        space wait for one another; searches on the older view are not disturbed.
        """
        space = self._resolve_space(space)
        cur = self._views.get(space)
        if cur is not None and not merge:
            r = self.db.one("SELECT generation, index_spec, index_params FROM spaces "
                            "WHERE space=?", (space,))
            if r is not None and int(r[0]) == cur.generation and r[1] == cur.spec \
                    and json.loads(r[2]) == cur.params:
                return cur
        with self._guard:
            lock = self._refresh_locks.setdefault(space, threading.Lock())
        with lock:
            cur = self._views.get(space)
            with self.db.read() as c:
                new = reader.build_view(c, self.path, space, cur)
                if merge:
                    new = reader.merge_view(new, force=True, source=reader.source_factory(
                        c, self.path, space, new.dim))
            self._views[space] = new
            return new

    def views(self, spaces: Sequence[str]) -> dict[str, SpaceView]:
        """Views of several spaces at ONE committed state (spaces that do not exist are
        left out): a search over two spaces (a backfill) never sees an item in both
        or in neither while a writer moves items between them."""
        with self._guard:
            locks = [self._refresh_locks.setdefault(s, threading.Lock()) for s in sorted(spaces)]
        for lk in locks:
            lk.acquire()
        try:
            out: dict[str, SpaceView] = {}
            with self.db.read() as c:
                present = {r[0] for r in c.execute("SELECT space FROM spaces")}
                for s in spaces:
                    if s in present:
                        out[s] = reader.build_view(c, self.path, s, self._views.get(s))
            self._views.update(out)
            return out
        finally:
            for lk in reversed(locks):
                lk.release()

    def shard_view(self, space: str, keys_filter: KeyFilter) -> SpaceView:
        """The view of one shard of ``space`` (the items ``keys_filter`` selects) at the
        latest commit: built from the data, then derived by the change log like every
        view (on a copy, swapped in; nobody mutates a published view)."""
        slot = f"{space}#{keys_filter.shard}/{keys_filter.shards}"
        with self._guard:
            lock = self._refresh_locks.setdefault(slot, threading.Lock())
        with lock, self.db.read() as c:
            new = reader.build_view(c, self.path, space, self._views.get(slot),
                                    keys_filter=keys_filter)
            self._views[slot] = new
            return new

    def index(self, space: str | None = None) -> SpaceView:
        """The current view of ``space`` (its index is ``view.base`` + delta)."""
        return self.view(space)

    def build_index(self, space: str | None = None, *, save: bool = True) -> SpaceView:
        """Rebuild the index of ``space`` from all its data (and save it)."""
        space = self._resolve_space(space)
        with self.db.read() as c:
            row = reader.space_row(c, space, self.path)
            v = reader.fresh_view(c, self.path, row, use_snapshot=False)
        self._views[space] = v
        if save and not self.readonly:
            self.save_index(space)
        return v

    def save_index(self, space: str | None = None) -> Path:
        """Save the current index of ``space`` as a checksummed snapshot."""
        self._check_writable()
        return writes.save_index(self, self._resolve_space(space))

    # -------------------------------------------------------------- payloads
    def payload_fields(self) -> dict[str, dict[str, int]]:
        """``{field: {type: items}}``: the filterable fields (store/payloads.py)."""
        with self.db.read() as c:
            return payloads.fields(c, self.payload_cache)

    def bind_filter(self, where: Any) -> Any:
        """``where`` (any filter form) checked against the gallery's fields, values typed
        (an InputError naming the fields there are, for an unknown one)."""
        with self.db.read() as c:
            return payloads.bound(c, payloads.check_where(where), self.payload_cache)

    def match_keys(self, where: Any) -> np.ndarray:
        """Sorted int64 keys of the items satisfying the filter ``where``."""
        with self.db.read() as c:
            return payloads.match_keys(c, payloads.check_where(where), self.payload_cache)

    def count_items(self, where: Any = None, *, space: str | None = None) -> int:
        """Items satisfying ``where`` (any filter form), holding data in ``space`` if given."""
        with self.db.read() as c:
            return listing.count_items(c, where, space=space, cache=self.payload_cache)

    def list_items(self, where: Any = None, *, space: str | None = None,
                   cursor: str | None = None, limit: int = 100) -> listing.Page:
        """One page of items in insertion order (``page.next_cursor`` continues it)."""
        with self.db.read() as c:
            return listing.list_items(c, where, space=space, cursor=cursor, limit=limit,
                                      cache=self.payload_cache)

    def search(self, queries: np.ndarray, k: int = 10, *, fingerprint: str | None = None,
               space: str | None = None, dim: int | None = None,
               funnel: tuple[int, int] | None = None, where: Any = None) -> SearchResult:
        """Top-``k`` items for ``(Q, D)`` query vectors made by model ``fingerprint``.

        The caller names the model that made the queries (``fingerprint``) or the
        space they belong to (``space``); when both are given they must agree (a
        CompatibilityError names both otherwise), so vectors of another model are
        never compared. ``k`` is clamped to the space's size (the result has
        ``min(k, items)`` columns).
        ``dim`` / ``funnel=(shortlist_dim, shortlist)``: adaptive-size search on a
        ``prefix`` index. ``where``: only items satisfying this payload filter
        (store/filtered.py: exact; pre- or post-filter by how many match). Returns
        string ids (``None`` for missing results).
        """
        from galleria.index.base import check_k
        from galleria.validate import as_embeddings

        k = check_k(k)
        if fingerprint is None and space is None:
            raise InputError("name the model that made the query vectors (fingerprint=...) or "
                             f"the space to search (space=...); {self.path} has "
                             f"{[sp.space for sp in self.spaces()]}")
        space = space if space is not None else fingerprint
        fingerprint = fingerprint if fingerprint is not None else space
        if fingerprint != space:
            raise CompatibilityError(
                f"query vectors come from model {fingerprint!r} but the gallery space "
                f"searched holds vectors of {space!r}")
        view = self.view(space)
        if view.kind != "global":
            raise InputError(f"space {space!r} holds local features; search it with a "
                             "local pipeline (galleria.search)")
        q = np.asarray(queries)
        got = q.shape[-1] if q.ndim in (1, 2) else None
        if got != view.dim:
            raise CompatibilityError(
                f"query vectors have dimension {got} but space {space!r} holds vectors "
                f"of dimension {view.dim}")
        q = as_embeddings(q, name="queries", dim=view.dim)
        if where is not None:
            if dim is not None or funnel is not None:
                raise InputError("a filter (where) does not combine with dim / funnel search")
            return filtered.search_filtered(self, q, k, space=space, where=where)[0]
        if (dim is not None or funnel is not None) and not hasattr(view.base, "funnel_search"):
            raise InputError(
                f"the index of {space!r} is {view.spec!r}; prefix and funnel search need a "
                "'prefix' index (galleria index ... --index prefix)")
        # k is clamped to the space: a result has min(k, items) columns (k = 1e9 allocates
        # nothing extra)
        return view.search_ids(q, clamp_k(k, view.count), dim=dim, funnel=funnel)

    # ------------------------------------------------------------- integrity
    def check(self, *, deep: bool = True) -> Any:
        """Verify every file against the database (see :func:`galleria.store.integrity.check`)."""
        from galleria.store.integrity import check

        return check(self, deep=deep)

    def backup(self) -> Path:
        """Copy the database to ``gallery.sqlite.backup`` (atomically), for ``repair``."""
        from galleria.store.integrity import backup

        return backup(self)

    def _check_writable(self) -> None:
        if self.readonly:
            raise InputError(f"gallery {self.path} is open read-only")
