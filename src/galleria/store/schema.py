"""SQLite schema of a gallery (``gallery.sqlite``); bump FORMAT_VERSION on change."""

from __future__ import annotations

FORMAT_VERSION = 1

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
    added REAL NOT NULL
);
-- an embedding space = the fingerprint of the model (or transform chain) that made it
CREATE TABLE IF NOT EXISTS spaces (
    space TEXT PRIMARY KEY,
    slug TEXT NOT NULL UNIQUE,
    dim INTEGER NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
-- append-only array files holding vectors of one space
CREATE TABLE IF NOT EXISTS segments (
    segment INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL REFERENCES spaces(space),
    file TEXT NOT NULL UNIQUE,
    n INTEGER NOT NULL
);
-- where the vector of (item, space) lives; at most one per pair
CREATE TABLE IF NOT EXISTS vectors (
    key INTEGER NOT NULL REFERENCES items(key),
    space TEXT NOT NULL REFERENCES spaces(space),
    segment INTEGER NOT NULL REFERENCES segments(segment),
    row INTEGER NOT NULL,
    PRIMARY KEY (key, space)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_by_space ON vectors(space, key);
CREATE INDEX IF NOT EXISTS vectors_by_segment ON vectors(segment);
-- change log: indexes replay it from the generation they were saved at
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
"""
