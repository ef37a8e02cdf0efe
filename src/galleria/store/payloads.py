"""Payloads: items' metadata as typed, indexed values, and filters evaluated on them.

Every item's metadata (manifest columns, upload metadata) is a JSON object in
``items.meta``. This module keeps a second, typed copy in the ``payloads`` table
-- one row per value, ``(key, field, type, num, text)``, list fields one row per
element, typed by :func:`galleria.filters.values.typed_values` -- with two
covering indexes: ``(field, text, key)`` for equality on text and
``(field, type, num, key)`` for numbers, booleans, dates and ranges.

- **Consistency.** The writer rewrites an item's rows in the transaction that
  changes its metadata (:func:`write`, called by ``store.writes``); triggers on
  ``items`` delete the rows of a deleted item and bump ``payload_state.gen`` on
  every insert, update and delete of an item, so a reader's cache knows when to
  drop what it computed. A gallery made before payloads existed gets the table,
  filled from its metadata, the first time it is opened for writing
  (:func:`ensure`); opened read-only it is filtered by the reference evaluator
  instead (exact, slower).
- **Evaluation.** A filter's leaf conditions are each one index range scan
  (``SELECT key ... WHERE field=? AND ...``); ``must`` / ``should`` /
  ``must_not`` are set operations on the sorted key arrays in numpy.
  :class:`PayloadCache` keeps leaf results and field statistics per payload
  generation, so a filter repeated between two writes costs one indexed read.

Manifest columns arrive as text: :func:`infer_columns` types them (numbers,
booleans, ``|``-separated lists) before they are stored.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galleria.errors import GalleriaError, InputError
from galleria.filters import (
    AnyOf,
    Bool,
    Exists,
    Filter,
    Match,
    Range,
    as_filter,
    bind,
    cache_key,
    conditions,
    is_empty,
    matches,
)
from galleria.filters.values import BOOL, DATE, NUMBER, STRING, parse_date, typed_values
from galleria.store.db import chunks

log = logging.getLogger(__name__)

CODES = {STRING: "s", NUMBER: "n", BOOL: "b", DATE: "d"}
NAMES = {v: k for k, v in CODES.items()}
VERSION = 1
"""Version of the payload rows' layout (a change rebuilds the table on open)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS payloads (
    key INTEGER NOT NULL,
    field TEXT NOT NULL,
    type TEXT NOT NULL,        -- s(tring) n(umber) b(ool) d(ate)
    num REAL,                  -- number, bool 0/1, date as seconds since 1970 UTC
    text TEXT                  -- string or date as written
);
CREATE INDEX IF NOT EXISTS payloads_text ON payloads(field, text, key);
CREATE INDEX IF NOT EXISTS payloads_num ON payloads(field, type, num, key);
CREATE INDEX IF NOT EXISTS payloads_key ON payloads(key);
CREATE TABLE IF NOT EXISTS payload_state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    gen INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS items_payload_insert AFTER INSERT ON items BEGIN
    UPDATE payload_state SET gen = gen + 1;
END;
CREATE TRIGGER IF NOT EXISTS items_payload_update AFTER UPDATE OF meta ON items BEGIN
    UPDATE payload_state SET gen = gen + 1;
END;
CREATE TRIGGER IF NOT EXISTS items_payload_delete AFTER DELETE ON items BEGIN
    DELETE FROM payloads WHERE key = old.key;
    UPDATE payload_state SET gen = gen + 1;
END;
"""


# ------------------------------------------------------------------ rows
def rows_of(key: int, meta: Mapping[str, Any] | None) -> list[tuple[int, str, str, Any, Any]]:
    """The payload rows of one item."""
    return [(int(key), f, CODES[v.type], v.number, v.text) for f, v in typed_values(meta)]


def has_table(c: sqlite3.Connection) -> bool:
    return c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='payload_state'"
                     ).fetchone() is not None


def _statements(sql: str) -> Iterable[str]:
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""


def current(c: sqlite3.Connection) -> bool:
    """Whether the gallery has the payload table at this layout version (one read)."""
    if not has_table(c):
        return False
    row = c.execute("SELECT version FROM payload_state WHERE id=0").fetchone()
    return row is not None and int(row[0]) == VERSION


def ensure(c: sqlite3.Connection) -> bool:
    """Create the payload table (and fill it from the items' metadata) when it is missing
    or of another layout version; call inside a write transaction. Returns whether it
    (re)built it."""
    if current(c):
        return False
    for trig in ("items_payload_insert", "items_payload_update", "items_payload_delete"):
        c.execute(f"DROP TRIGGER IF EXISTS {trig}")
    c.execute("DROP TABLE IF EXISTS payloads")
    for stmt in _statements(SCHEMA):
        c.execute(stmt)
    c.execute("INSERT OR REPLACE INTO payload_state(id, gen, version) VALUES(0, "
              "COALESCE((SELECT gen FROM payload_state WHERE id=0), 0) + 1, ?)", (VERSION,))
    rows: list[tuple[int, str, str, Any, Any]] = []
    for key, meta in c.execute("SELECT key, meta FROM items").fetchall():
        rows += rows_of(key, json.loads(meta))
        if len(rows) > 50_000:
            c.executemany("INSERT INTO payloads VALUES(?,?,?,?,?)", rows)
            rows = []
    c.executemany("INSERT INTO payloads VALUES(?,?,?,?,?)", rows)
    return True


def ensure_on(db: Any) -> None:
    """:func:`ensure` on a :class:`~galleria.store.db.Database` opened for writing (a read
    first: nothing is written when the table is current). A gallery that cannot be
    written is filtered by the reference evaluator instead."""

    try:
        with db.read() as c:
            if current(c):
                return
        with db.write() as c:
            if ensure(c):
                log.info("%s: built the payload index from the items' metadata", db.path)
    except GalleriaError as exc:
        log.warning("payload index not built (%s); filters use the slower reference "
                    "evaluator", exc)


def write(c: sqlite3.Connection, items: Iterable[tuple[int, Mapping[str, Any] | None]]) -> None:
    """Replace the payload rows of ``items`` (``(key, meta)`` pairs); call in the write
    transaction that stores that metadata. A no-op on a gallery without the table."""
    items = list(items)
    if not items or not has_table(c):
        return
    keys = [int(k) for k, _ in items]
    for ch in chunks(keys):
        c.execute(f"DELETE FROM payloads WHERE key IN ({','.join('?' * len(ch))})", ch)
    c.executemany("INSERT INTO payloads VALUES(?,?,?,?,?)",
                  [r for k, m in items for r in rows_of(k, m)])


def generation(c: sqlite3.Connection) -> int | None:
    """The payload generation (changes with every item insert, metadata change and
    delete); ``None`` on a gallery without the payload table."""
    try:
        row = c.execute("SELECT gen FROM payload_state WHERE id=0").fetchone()
    except sqlite3.OperationalError:
        return None
    return int(row[0]) if row else None


# ------------------------------------------------------------------ manifests
_INT = re.compile(r"-?(0|[1-9]\d*)")
_FLOAT = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
KINDS = ("string", "number", "bool", "list", "date")


@dataclass(frozen=True)
class ColumnTypes:
    """How the text cells of a manifest's columns become JSON values.

    ``types`` maps a column name (as written in the header) to ``(field, kind)``:
    ``number`` (empty cells left out), ``bool`` (``true``/``false``, any case),
    ``list`` (``|``-separated strings), ``string`` or ``date`` (kept as text; an ISO
    date is typed as a date by the payload index).
    """

    types: dict[str, tuple[str, str]] = field(default_factory=dict)

    def apply(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for col, v in row.items():
            name, kind = self.types.get(col, (col, "string"))
            if not isinstance(v, str):
                out[name] = v
            elif kind == "number":
                if v.strip():
                    x = float(v)
                    out[name] = int(x) if _INT.fullmatch(v.strip()) and abs(x) < 2**53 else x
            elif kind == "bool":
                if v.strip():
                    out[name] = v.strip().lower() == "true"
            elif kind == "list":
                out[name] = [p.strip() for p in v.split("|") if p.strip()]
            else:
                out[name] = v
        return out


def infer_columns(rows: Sequence[Mapping[str, Any]]) -> ColumnTypes:
    """Column types of manifest rows: a header ``name:kind`` (kind in number, bool, list,
    string, date) says it; otherwise a column whose non-empty cells are all numbers is
    a number, all ``true``/``false`` a bool, else a string.

    Raises:
        InputError: an unknown kind, or a cell that is not of its column's stated kind.
    """
    cols: dict[str, list[str]] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, str):
                cols.setdefault(k, []).append(v.strip())
    types: dict[str, tuple[str, str]] = {}
    for col, vals in cols.items():
        name, sep, kind = col.rpartition(":")
        if sep and name and kind in KINDS:
            bad = _not_of_kind(vals, kind)
            if bad is not None:
                raise InputError(f"manifest column {col!r}: {bad!r} is not a {kind}")
            types[col] = (name, kind)
            continue
        full = [v for v in vals if v]
        if full and all(_FLOAT.fullmatch(v) for v in full):
            types[col] = (col, "number")
        elif full and all(v.lower() in ("true", "false") for v in full):
            types[col] = (col, "bool")
    return ColumnTypes(types)


def _not_of_kind(vals: Sequence[str], kind: str) -> str | None:
    for v in vals:
        if not v:
            continue
        if kind == "number" and not _FLOAT.fullmatch(v):
            return v
        if kind == "bool" and v.lower() not in ("true", "false"):
            return v
        if kind == "date" and parse_date(v) is None:
            return v
    return None


# ------------------------------------------------------------------ evaluation
def _leaf_sql(f: Match | AnyOf | Range | Exists) -> tuple[str, list[Any]]:
    base = "SELECT key FROM payloads WHERE field=?"
    args: list[Any] = [f.field]
    if isinstance(f, Exists):
        return base, args
    if isinstance(f, Range):
        sql = base + " AND type=?"
        args.append(CODES[DATE if f.kind == DATE else NUMBER])
        for op, v in f.bounds().items():
            sql += f" AND num {dict(gt='>', gte='>=', lt='<', lte='<=')[op]} ?"
            args.append(v)
        return sql, args
    vals = [f.value] if isinstance(f, Match) else list(f.values)
    texts = [v for v in vals if isinstance(v, str)]
    bools = [1.0 if v else 0.0 for v in vals if isinstance(v, bool)]
    nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    ors: list[str] = []
    if texts:
        ors.append(f"text IN ({','.join('?' * len(texts))})")
        args += texts
    for code, xs in (("n", nums), ("b", bools)):
        if xs:
            ors.append(f"(type='{code}' AND num IN ({','.join('?' * len(xs))}))")
            args += xs
    return f"{base} AND ({' OR '.join(ors)})", args


def _keys(c: sqlite3.Connection, sql: str, args: Sequence[Any]) -> np.ndarray:
    """Sorted unique keys a ``SELECT key ...`` returns (one text from SQLite, parsed by
    numpy: 3x faster than a row per key)."""
    row = c.execute(f"SELECT group_concat(key) FROM ({sql})", args).fetchone()
    if row is None or not row[0]:
        return np.zeros(0, np.int64)
    return np.unique(np.array(row[0].split(","), dtype=np.int64))


class PayloadCache:
    """Leaf key sets, the item universe and field statistics of one gallery, kept per
    payload generation (thread safe; bounded)."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._gen: Any = object()
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, gen: Any, key: str, make: Any) -> Any:
        with self._lock:
            if gen != self._gen:
                self._gen, self._items = gen, OrderedDict()
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            if gen == self._gen:
                self._items[key] = value
                while len(self._items) > self.max_entries:
                    self._items.popitem(last=False)
        return value


def fields(c: sqlite3.Connection, cache: PayloadCache | None = None) -> dict[str, dict[str, int]]:
    """``{field: {type: values}}`` (the gallery's payload schema; a list counts each
    element). A scan of the payload index: cached per payload generation."""
    gen = generation(c)
    if gen is None:
        return _fields_from_meta(c)

    def make() -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for f, t, n in c.execute("SELECT field, type, COUNT(*) FROM payloads "
                                 "GROUP BY field, type"):
            out.setdefault(f, {})[NAMES[t]] = int(n)
        return out

    return cache.get(gen, "\0fields", make) if cache is not None else make()


def _fields_from_meta(c: sqlite3.Connection) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (meta,) in c.execute("SELECT meta FROM items"):
        for f, v in typed_values(json.loads(meta)):
            d = out.setdefault(f, {})
            d[v.type] = d.get(v.type, 0) + 1
    return out


def field_types(c: sqlite3.Connection, names: Iterable[str]) -> dict[str, dict[str, int]]:
    """``{field: {type: 1}}`` for the types each of ``names`` holds (one index seek per
    field and type; fields no item has are left out)."""
    out: dict[str, dict[str, int]] = {}
    for f in set(names):
        for t, code in CODES.items():
            if c.execute("SELECT EXISTS(SELECT 1 FROM payloads WHERE field=? AND type=?)",
                         (f, code)).fetchone()[0]:
                out.setdefault(f, {})[t] = 1
    return out


def bound(c: sqlite3.Connection, where: Filter, cache: PayloadCache | None = None) -> Filter:
    """``where`` checked against the gallery's fields, literals typed (:func:`bind`).

    Only the fields ``where`` names are looked up; the full field list (a scan) is read
    for the error message when one of them does not exist."""
    if generation(c) is None:
        return bind(where, fields(c, cache))
    names = [x.field for x in conditions(where)]
    types = field_types(c, names)
    if len(types) < len(set(names)):
        return bind(where, fields(c, cache))  # raises, naming the fields there are
    return bind(where, types)


def match_keys(c: sqlite3.Connection, where: Filter, cache: PayloadCache | None = None
               ) -> np.ndarray:
    """Sorted unique int64 keys of the items satisfying ``where`` (checked and typed here).

    An empty filter matches every item.
    """
    f = bound(c, where, cache)
    gen = generation(c)
    if gen is None:  # read-only gallery from before payloads: the reference evaluator
        keys = [int(k) for k, m in c.execute("SELECT key, meta FROM items")
                if matches(f, json.loads(m))]
        return np.array(sorted(keys), np.int64)

    def leaf(x: Match | AnyOf | Range | Exists) -> np.ndarray:
        sql, args = _leaf_sql(x)
        if cache is None:
            return _keys(c, sql, args)
        return cache.get(gen, cache_key(x), lambda: _keys(c, sql, args))  # type: ignore[no-any-return]

    def universe() -> np.ndarray:
        def make() -> np.ndarray:
            return _keys(c, "SELECT key FROM items", ())
        return cache.get(gen, "\0all", make) if cache is not None else make()  # type: ignore[no-any-return]

    return _evaluate(f, leaf, universe)


def _evaluate(f: Filter, leaf: Any, universe: Any) -> np.ndarray:
    if not isinstance(f, Bool):
        return leaf(f)  # type: ignore[no-any-return]
    if is_empty(f):
        return universe()  # type: ignore[no-any-return]
    out: np.ndarray | None = None
    for x in f.must:
        k = _evaluate(x, leaf, universe)
        out = k if out is None else np.intersect1d(out, k, assume_unique=True)
    if f.should:
        any_ = _union([_evaluate(x, leaf, universe) for x in f.should])
        out = any_ if out is None else np.intersect1d(out, any_, assume_unique=True)
    if f.must_not:
        if out is None:
            out = universe()
        out = np.setdiff1d(out, _union([_evaluate(x, leaf, universe) for x in f.must_not]),
                           assume_unique=True)
    assert out is not None
    return out


def _union(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    return np.unique(np.concatenate(parts))


def check_where(where: Any) -> Filter:
    """``where`` as a filter (any form :func:`galleria.filters.as_filter` takes)."""

    f = as_filter(where)
    if f is None:
        raise InputError("no filter given")
    return f
