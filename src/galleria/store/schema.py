"""SQLite schema of a gallery (``gallery.sqlite``); bump FORMAT_VERSION on change.

Version 2 (this one) adds: per-space ``kind`` (global vectors or local
features), ``count`` and ``generation`` kept in the space row (a search reads
one row, never a COUNT), ``log_floor`` (change-log rows below it were pruned),
per-segment byte size and SHA-256, per-item content hashes, saved index
snapshots recorded in the database (with checksums), files retired by
compaction (deleted after a grace period, so a reader of an older snapshot
never loses a file), and items whose vectors were lost beyond repair.
"""

from __future__ import annotations

FORMAT_VERSION = 2

HEADER = "gallery.json"
DB = "gallery.sqlite"
BACKUP = "gallery.sqlite.backup"

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- one row per item; key is the int64 id used by indexes
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    meta TEXT NOT NULL DEFAULT '{}',
    added REAL NOT NULL,
    content TEXT,              -- 'sha256:<hex>' of the image file the vectors came from
    fsize INTEGER,             -- its size and mtime, to skip re-hashing unchanged files
    fmtime INTEGER
);
-- an embedding space = the fingerprint of the model (or transform chain) that made it
CREATE TABLE IF NOT EXISTS spaces (
    space TEXT PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    dim INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'global' CHECK (kind IN ('global', 'local')),
    info TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    count INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,
    log_floor INTEGER NOT NULL DEFAULT 0,
    index_spec TEXT NOT NULL DEFAULT 'exact',
    index_params TEXT NOT NULL DEFAULT '{}'
);
-- immutable array files holding the vectors (or local features) of one space
CREATE TABLE IF NOT EXISTS segments (
    segment INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL REFERENCES spaces(space),
    file TEXT NOT NULL UNIQUE,
    n INTEGER NOT NULL,        -- items whose data the file holds when written
    rows INTEGER NOT NULL,     -- array rows (= n for global spaces; features for local)
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
-- where the data of (item, space) lives: rows [row, row + n) of a segment
CREATE TABLE IF NOT EXISTS vectors (
    key INTEGER NOT NULL REFERENCES items(key),
    space TEXT NOT NULL REFERENCES spaces(space),
    segment INTEGER NOT NULL REFERENCES segments(segment),
    row INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (key, space)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_by_space ON vectors(space, key);
CREATE INDEX IF NOT EXISTS vectors_by_segment ON vectors(segment);
-- change log: views and saved indexes replay it from the generation they reflect
CREATE TABLE IF NOT EXISTS log (
    gen INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'del')),
    key INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_by_space ON log(space, gen);
-- inputs that could not be embedded (reported, retried on the next run)
CREATE TABLE IF NOT EXISTS failures (
    id TEXT NOT NULL,
    space TEXT NOT NULL,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (id, space)
);
-- the saved index of a space: folder, the generation it reflects, its files' checksums
CREATE TABLE IF NOT EXISTS index_snapshots (
    space TEXT PRIMARY KEY REFERENCES spaces(space),
    folder TEXT NOT NULL,
    generation INTEGER NOT NULL,
    files TEXT NOT NULL,       -- JSON {name: {"nbytes": n, "sha256": hex}}
    spec TEXT NOT NULL,
    saved REAL NOT NULL
);
-- files no committed row refers to any more; deleted after a grace period
CREATE TABLE IF NOT EXISTS retired (
    path TEXT PRIMARY KEY,     -- relative to the gallery folder (file or folder)
    at REAL NOT NULL
);
-- items whose data in a space was lost (damaged file) and could not be re-made
CREATE TABLE IF NOT EXISTS lost (
    key INTEGER NOT NULL,
    space TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (key, space)
);
"""
