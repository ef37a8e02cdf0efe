"""Listing, scrolling and counting items, with an optional payload filter.

Pages follow the items' keys (handed out in insertion order, never reused), so a
cursor stays valid while other processes add and remove items: a scroll returns
every item that exists from its start to its end exactly once, and never an item
twice. A cursor is opaque text (:func:`encode_cursor`).
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.filters import Filter, as_filter, is_empty
from galleria.store import items, payloads
from galleria.store.db import chunks

MAX_LIMIT = 10_000


@dataclass(frozen=True)
class Page:
    """One page of a listing: items in key order and the cursor of the next page
    (``None`` at the end)."""

    items: list[items.ItemRecord]
    next_cursor: str | None

    def to_dict(self, *, public: bool = True) -> dict[str, Any]:
        return {"items": [record_dict(r, public=public) for r in self.items],
                "next_cursor": self.next_cursor}


def record_dict(r: items.ItemRecord, *, public: bool = True) -> dict[str, Any]:
    """An item as JSON (``public``: without the server-side image path)."""
    meta = {k: v for k, v in r.meta.items() if not (public and k == "path")}
    return {"id": r.id, "metadata": meta, "spaces": list(r.spaces), "added": r.added,
            "content": r.content}


def encode_cursor(key: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": int(key)}).encode()).decode()


def decode_cursor(cursor: str | None) -> int:
    """The key a cursor continues after (``-1`` for the first page)."""
    if cursor is None or cursor == "":
        return -1
    try:
        obj = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        key = obj["after"]
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise ValueError(key)
        return key
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError(f"not a cursor of this gallery: {cursor[:40]!r} (pass the "
                         "next_cursor of the previous page)") from None


def _limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) \
            or not 1 <= int(limit) <= MAX_LIMIT:
        raise InputError(f"limit must be an integer between 1 and {MAX_LIMIT}; got {limit!r}")
    return int(limit)


def _filter(where: Any) -> Filter | None:
    f = as_filter(where)
    return None if is_empty(f) else f


def matching(c: sqlite3.Connection, where: Any, space: str | None,
             cache: payloads.PayloadCache | None) -> np.ndarray | None:
    """Sorted keys of the items satisfying ``where`` (and holding data in ``space``);
    ``None`` when neither is given (every item)."""
    f = _filter(where)
    keys = payloads.match_keys(c, f, cache) if f is not None else None
    if space is not None:
        if c.execute("SELECT 1 FROM spaces WHERE space=?", (space,)).fetchone() is None:
            raise InputError(f"no space {space!r} in this gallery")
        sk = items.space_keys(c, space)
        keys = sk if keys is None else np.intersect1d(keys, sk, assume_unique=True)
    return keys


def count_items(c: sqlite3.Connection, where: Any = None, *, space: str | None = None,
                cache: payloads.PayloadCache | None = None) -> int:
    """How many items satisfy ``where`` (and hold data in ``space``)."""
    if _filter(where) is None:
        if space is None:
            return int(c.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        row = c.execute("SELECT count FROM spaces WHERE space=?", (space,)).fetchone()
        if row is None:
            raise InputError(f"no space {space!r} in this gallery")
        return int(row[0])
    keys = matching(c, where, space, cache)
    assert keys is not None
    return int(keys.size)


def list_items(c: sqlite3.Connection, where: Any = None, *, space: str | None = None,
               cursor: str | None = None, limit: int = 100,
               cache: payloads.PayloadCache | None = None) -> Page:
    """One page of the items satisfying ``where`` (and holding data in ``space``), in key
    order, after ``cursor``."""
    limit = _limit(limit)
    after = decode_cursor(cursor)
    keys = matching(c, where, space, cache)
    if keys is None:
        page = [int(r[0]) for r in c.execute(
            "SELECT key FROM items WHERE key > ? ORDER BY key LIMIT ?", (after, limit + 1))]
    else:
        start = int(np.searchsorted(keys, after, side="right"))
        page = [int(k) for k in keys[start : start + limit + 1]]
    more = len(page) > limit
    page = page[:limit]
    recs = _records(c, page)
    return Page(recs, encode_cursor(page[-1]) if more and page else None)


def _records(c: sqlite3.Connection, keys: list[int]) -> list[items.ItemRecord]:
    rows: dict[int, tuple[Any, ...]] = {}
    spaces: dict[int, list[str]] = {}
    for ch in chunks(keys):
        q = ",".join("?" * len(ch))
        for r in c.execute(f"SELECT key, id, meta, added, content FROM items WHERE key IN ({q})",
                           ch):
            rows[int(r[0])] = r
        for k, sp in c.execute(f"SELECT key, space FROM vectors WHERE key IN ({q}) "
                               "ORDER BY space", ch):
            spaces.setdefault(int(k), []).append(sp)
    return [items.ItemRecord(rows[k][1], k, json.loads(rows[k][2]), float(rows[k][3]),
                             rows[k][4], tuple(spaces.get(k, ()))) for k in keys if k in rows]
