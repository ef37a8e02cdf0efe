"""Item lookups and the change feed: what callers outside the store read.

Each function takes a connection (``db.read()`` or the caller's own
transaction) so that several lookups can share one committed state; the
:class:`~galleria.store.gallery.Gallery` facade wraps them in one read each.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from galleria.store.db import chunks
from galleria.store.images import resolve_image_path
from galleria.types import MISSING_KEY


@dataclass(frozen=True)
class ItemRecord:
    """One item as stored: its key, metadata, when it was added, the content hash of its
    image and the spaces holding its data."""

    id: str
    key: int
    meta: dict[str, Any]
    added: float
    content: str | None
    spaces: tuple[str, ...]


@dataclass(frozen=True)
class Change:
    """One change-log row: at ``generation``, ``op`` (``add`` | ``remove``) of item ``key``
    (``id``; ``None`` when the item no longer exists) in ``space``."""

    generation: int
    space: str
    op: str
    key: int
    id: str | None


def item(c: sqlite3.Connection, item_id: str, root: Any = None) -> ItemRecord | None:
    """One item; with ``root`` (the gallery folder) its image path is resolved
    (:func:`galleria.store.images.resolve_image_path`)."""
    row = c.execute("SELECT key, meta, added, content FROM items WHERE id=?",
                    (item_id,)).fetchone()
    if row is None:
        return None
    spaces = tuple(r[0] for r in c.execute(
        "SELECT space FROM vectors WHERE key=? ORDER BY space", (int(row[0]),)))
    meta = _resolved(json.loads(row[1]), root)
    return ItemRecord(item_id, int(row[0]), meta, float(row[2]), row[3], spaces)


def _resolved(meta: dict[str, Any], root: Any) -> dict[str, Any]:
    if root is not None and isinstance(meta, dict) and meta.get("path"):
        meta["path"] = resolve_image_path(root, meta["path"])
    return meta


def ids(c: sqlite3.Connection, space: str | None = None) -> list[str]:
    """Item ids in key order; with ``space``, only items that have data there."""
    if space is None:
        return [r[0] for r in c.execute("SELECT id FROM items ORDER BY key")]
    return [r[0] for r in c.execute(
        "SELECT i.id FROM items i JOIN vectors v ON v.key = i.key WHERE v.space=? "
        "ORDER BY i.key", (space,))]


def has(c: sqlite3.Connection, item_ids: Sequence[str], space: str) -> np.ndarray:
    """``(N,)`` bool: which ids have data in ``space``."""
    present: set[str] = set()
    for ch in chunks(list(item_ids)):
        q = ",".join("?" * len(ch))
        present.update(r[0] for r in c.execute(
            f"SELECT i.id FROM items i JOIN vectors v ON v.key=i.key "
            f"WHERE v.space=? AND i.id IN ({q})", (space, *ch)))
    return np.array([i in present for i in item_ids], dtype=bool)


def keys_of(c: sqlite3.Connection, item_ids: Sequence[Any]) -> np.ndarray:
    """int64 keys of ids (-1 for unknown ids and non-strings)."""
    found: dict[str, int] = {}
    for ch in chunks([i for i in item_ids if isinstance(i, str)]):
        q = ",".join("?" * len(ch))
        found.update(c.execute(f"SELECT id, key FROM items WHERE id IN ({q})", ch).fetchall())
    return np.array([found.get(i, MISSING_KEY) if isinstance(i, str) else MISSING_KEY
                     for i in item_ids], dtype=np.int64)


def ids_of(c: sqlite3.Connection, keys: np.ndarray) -> np.ndarray:
    """Object array of ids for int64 keys, ``None`` for -1 or unknown keys (any shape)."""
    keys = np.asarray(keys, dtype=np.int64)
    uniq = [int(k) for k in np.unique(keys) if k != MISSING_KEY]
    found: dict[int, str] = {}
    for ch in chunks(uniq):
        q = ",".join("?" * len(ch))
        found.update(c.execute(f"SELECT key, id FROM items WHERE key IN ({q})", ch).fetchall())
    out = np.empty(keys.shape, dtype=object)
    flat = out.reshape(-1)
    for n, k in enumerate(keys.reshape(-1)):
        flat[n] = found.get(int(k))
    return out


def metas(c: sqlite3.Connection, item_ids: Sequence[str], root: Any = None
          ) -> list[dict[str, Any] | None]:
    """Items' metadata (``None`` for unknown ids); with ``root``, image paths resolved."""
    found: dict[str, dict[str, Any]] = {}
    for ch in chunks(list(item_ids)):
        q = ",".join("?" * len(ch))
        for i, m in c.execute(f"SELECT id, meta FROM items WHERE id IN ({q})", ch):
            found[i] = _resolved(json.loads(m), root)
    return [found.get(i) for i in item_ids]


def contents(c: sqlite3.Connection, item_ids: Sequence[str]
             ) -> dict[str, tuple[str | None, int | None, int | None]]:
    """``id -> (content hash, file size, mtime_ns)`` recorded for known ids."""
    out = {}
    for ch in chunks(list(item_ids)):
        q = ",".join("?" * len(ch))
        for i, h, s, m in c.execute(
                f"SELECT id, content, fsize, fmtime FROM items WHERE id IN ({q})", ch):
            out[i] = (h, s, m)
    return out


def space_keys(c: sqlite3.Connection, space: str) -> np.ndarray:
    """Sorted int64 keys of the items with data in ``space``."""
    return np.array([r[0] for r in c.execute(
        "SELECT key FROM vectors WHERE space=? ORDER BY key", (space,))], np.int64)


def changes_since(c: sqlite3.Connection, generation: int, *, space: str | None = None
                  ) -> list[Change]:
    """Change-log rows after ``generation`` (of one space, or of all), in commit order.

    The log is pruned below each space's ``log_floor`` (see :func:`log_floors`): a
    reader behind it must reload the space instead.
    """
    if space is None:
        rows = c.execute("SELECT l.gen, l.space, l.op, l.key, i.id FROM log l LEFT JOIN items i "
                         "ON i.key = l.key WHERE l.gen > ? ORDER BY l.gen",
                         (int(generation),)).fetchall()
    else:
        rows = c.execute("SELECT l.gen, l.space, l.op, l.key, i.id FROM log l LEFT JOIN items i "
                         "ON i.key = l.key WHERE l.space = ? AND l.gen > ? ORDER BY l.gen",
                         (space, int(generation))).fetchall()
    return [Change(int(g), s, op, int(k), i) for g, s, op, k, i in rows]


def log_floors(c: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """``space -> (log floor, generation)``: the change log of a space is complete above
    its floor."""
    return {s: (int(f), int(g)) for s, f, g in
            c.execute("SELECT space, log_floor, generation FROM spaces")}


def id_table(c: sqlite3.Connection, above_key: int = -1) -> dict[int, str]:
    """``key -> id`` of the items whose key is above ``above_key``."""
    return {int(k): i for k, i in c.execute("SELECT key, id FROM items WHERE key > ?",
                                            (int(above_key),))}


class Snapshot:
    """Lookups at ONE committed state (``with gallery.snapshot() as s: ...``)."""

    def __init__(self, c: sqlite3.Connection, root: Any) -> None:
        self.c, self.root = c, root

    def item(self, item_id: str) -> ItemRecord | None:
        return item(self.c, item_id, self.root)

    def ids(self, space: str | None = None) -> list[str]:
        return ids(self.c, space)

    def has(self, item_ids: Sequence[str], space: str) -> np.ndarray:
        return has(self.c, item_ids, space)

    def keys_of(self, item_ids: Sequence[Any]) -> np.ndarray:
        return keys_of(self.c, item_ids)

    def ids_of(self, keys: np.ndarray) -> np.ndarray:
        return ids_of(self.c, keys)

    def metas(self, item_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        return metas(self.c, item_ids, self.root)

    def space_keys(self, space: str) -> np.ndarray:
        return space_keys(self.c, space)

    def present(self, space: str, keys: Sequence[int]) -> set[int]:
        """The ``keys`` that have data in ``space``."""
        out: set[int] = set()
        for ch in chunks([int(k) for k in keys]):
            q = ",".join("?" * len(ch))
            out.update(int(r[0]) for r in self.c.execute(
                f"SELECT key FROM vectors WHERE space=? AND key IN ({q})", (space, *ch)))
        return out

    def changes_since(self, generation: int, *, space: str | None = None) -> list[Change]:
        return changes_since(self.c, generation, space=space)

    def log_floors(self) -> dict[str, tuple[int, int]]:
        return log_floors(self.c)

    def id_table(self, above_key: int = -1) -> dict[int, str]:
        return id_table(self.c, above_key)

    def vectors(self, space: str, keys: np.ndarray) -> np.ndarray | None:
        """``(n, D)`` vectors of ``keys`` in a global space (``None`` for a local space or
        a space that does not exist)."""
        from galleria.store import reader  # reader imports views -> index; items stays light

        try:
            row = reader.space_row(self.c, space, self.root)
        except Exception:
            return None
        if row.kind != "global":
            return None
        return reader.fetch(self.c, self.root, row, np.asarray(keys, np.int64))  # type: ignore[no-any-return]
