"""The store's writer: every change to a gallery goes through these functions.

Each holds the gallery's writer lock (:mod:`galleria.store.lock`) for one
operation: write the new segment file (atomically), then commit one SQLite
transaction that references it, updates the space's ``count`` and
``generation`` and appends to the change log. A crash before the commit leaves
an unreferenced file (swept later); a crash after it leaves a complete state.
Files that compaction or a new index snapshot replace are *retired* and only
deleted after :data:`RETIRE_GRACE_S`, so a reader still holding an older
snapshot can finish reading them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from galleria.errors import CompatibilityError, InputError, StorageError
from galleria.fingerprint import slug
from galleria.ids import id_problem
from galleria.store import payloads
from galleria.store.db import chunks
from galleria.store.segments import WrittenFile, file_digest, pack_local, write_array
from galleria.types import MISSING_KEY, LocalFeatures
from galleria.validate import as_embeddings

if TYPE_CHECKING:
    from galleria.store.gallery import Gallery

log = logging.getLogger(__name__)

RETIRE_GRACE_S = 600.0
"""Retired files are deleted this long after they stopped being referenced."""
COMPACT_SEGMENTS = 64
"""Merge a space's small segment files once it has more than this many."""
LARGE_SEGMENT = 1 << 16
"""Segments with at least this many rows are left alone by compaction (tiered merging)."""
LOG_KEEP = 50_000
"""Change-log rows below the saved index's generation are pruned past this many."""
NORM_TOLERANCE = 1e-3

Content = tuple[str, int | None, int | None]
"""``(content hash, file size, file mtime_ns)`` of the image an item's data came from."""


# ------------------------------------------------------------------ checks
def check_ids(ids: Sequence[Any]) -> list[str]:
    """Item ids as strings (the rule of :mod:`galleria.ids`), unique within the call."""
    out: list[str] = []
    for i in ids:
        why = id_problem(i)
        if why is not None:
            raise InputError(f"{why}; give the item another id" if isinstance(i, str)
                             else f"{why} ({i!r})")
        out.append(i)
    if not out:
        raise InputError("at least one id is needed")
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = [i for i in out if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        raise InputError(f"duplicate ids in one call: {dup[:5]}")
    return out


def check_vectors(x: Any, n: int, dim: int | None, *, normalized: bool = True) -> np.ndarray:
    """``(n, D)`` float32: finite, non-zero and (for normalised spaces) unit rows."""
    shape = np.shape(x)
    if dim is not None and len(shape) in (1, 2) and shape[-1] != dim:
        raise CompatibilityError(f"the space holds vectors of dimension {dim}; got vectors of "
                                 f"dimension {shape[-1]}")
    arr = as_embeddings(x, name="vectors", dim=dim)
    if arr.shape[0] != n:
        raise InputError(f"{n} ids but {arr.shape[0]} vectors")
    norms = np.linalg.norm(arr, axis=1)
    zero = norms == 0
    if zero.any():
        raise InputError(f"{int(zero.sum())} of {n} vectors are all zeros (rows "
                         f"{np.flatnonzero(zero)[:5].tolist()}); a zero vector matches nothing")
    if normalized:
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            raise InputError(
                f"{int(off.sum())} of {n} vectors are not L2-normalised (norms like "
                f"{norms[off][:3].round(4).tolist()}); the space compares by cosine: "
                "normalise them (galleria.validate.l2_normalize)"
            )
    return arr


# ------------------------------------------------------------------ helpers
def new_segment_name(space: str) -> str:
    return (Path("segments") / slug(space) / f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}.npy"
            ).as_posix()


def _upsert_items(c: sqlite3.Connection, ids: list[str],
                  meta: Sequence[dict[str, Any] | None] | None,
                  contents: Sequence[Content | None] | None) -> np.ndarray:
    now = time.time()
    c.executemany("INSERT OR IGNORE INTO items(id, meta, added) VALUES(?, '{}', ?)",
                  [(i, now) for i in ids])
    found: dict[str, tuple[int, str]] = {}
    for ch in chunks(ids):
        q = ",".join("?" * len(ch))
        for i, k, m in c.execute(f"SELECT id, key, meta FROM items WHERE id IN ({q})", ch):
            found[i] = (int(k), m)
    upd_meta = []
    typed: list[tuple[int, dict[str, Any]]] = []
    for n, i in enumerate(ids):
        if meta is not None and meta[n]:
            old = json.loads(found[i][1])
            old.update(meta[n])  # type: ignore[arg-type]
            upd_meta.append((json.dumps(old), i))
            typed.append((found[i][0], old))
    if upd_meta:
        c.executemany("UPDATE items SET meta=? WHERE id=?", upd_meta)
        payloads.write(c, typed)  # the typed, indexed copy, in the same transaction
    if contents is not None:
        c.executemany("UPDATE items SET content=?, fsize=?, fmtime=? WHERE id=?",
                      [(ct[0], ct[1], ct[2], i) for i, ct in zip(ids, contents, strict=True)
                       if ct is not None])
    return np.array([found[i][0] for i in ids], dtype=np.int64)


def _present(c: sqlite3.Connection, keys: Sequence[int], space: str) -> set[int]:
    out: set[int] = set()
    for ch in chunks([int(k) for k in keys]):
        q = ",".join("?" * len(ch))
        out.update(r[0] for r in c.execute(
            f"SELECT key FROM vectors WHERE space=? AND key IN ({q})", (space, *ch)))
    return out


def _bump(c: sqlite3.Connection, space: str, delta_count: int) -> None:
    gen = c.execute("SELECT MAX(gen) FROM log WHERE space=?", (space,)).fetchone()[0] or 0
    c.execute("UPDATE spaces SET count = count + ?, generation = ? WHERE space=?",
              (int(delta_count), int(gen), space))


def delete_vectors(c: sqlite3.Connection, keys: Sequence[int], space: str) -> int:
    """Delete the data of ``keys`` in ``space`` (logged, counted); returns how many."""
    existing = sorted(_present(c, keys, space))
    if not existing:
        return 0
    for ch in chunks(existing):
        q = ",".join("?" * len(ch))
        c.execute(f"DELETE FROM vectors WHERE space=? AND key IN ({q})", (space, *ch))
    c.executemany("INSERT INTO log(space, op, key) VALUES(?, 'del', ?)",
                  [(space, k) for k in existing])
    _bump(c, space, -len(existing))
    return len(existing)


def _space_meta(c: sqlite3.Connection, space: str, where: Path) -> tuple[int, str, dict[str, Any]]:
    row = c.execute("SELECT dim, kind, info FROM spaces WHERE space=?", (space,)).fetchone()
    if row is None:
        raise CompatibilityError(f"gallery {where} has no space {space!r}; register it first")
    return int(row[0]), str(row[1]), json.loads(row[2])


# ------------------------------------------------------------------ add
@dataclass(frozen=True)
class Packed:
    """One segment's data: ``array`` rows, item ``n`` owning ``starts[n] : starts[n] +
    counts[n]`` (one row per item for global vectors, its features for local ones)."""

    array: np.ndarray
    starts: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class AddRules:
    """How an add treats existing data (see :meth:`Gallery.add`).

    Attributes:
        replace: overwrite existing data of (item, space); otherwise an error.
        drop_spaces: in the same transaction, delete the items' data in these spaces.
        only_if_in: add only items that still have data in that space at commit time
            (the others are skipped, key ``-1``): an upgrade never resurrects an item
            deleted while it was being re-embedded.
    """

    replace: bool = False
    drop_spaces: Sequence[str] = ()
    only_if_in: str | None = None


def add_records(
    g: Gallery,
    ids: Sequence[str],
    data: Packed,
    *,
    space: str,
    meta: Sequence[dict[str, Any] | None] | None = None,
    contents: Sequence[Content | None] | None = None,
    rules: AddRules = AddRules(),
) -> np.ndarray:
    """Commit one segment of ``space`` holding the data of ``ids``; returns the items'
    int64 keys (``-1`` for items skipped by ``rules.only_if_in``)."""
    array, starts, counts = data.array, data.starts, data.counts
    replace, drop_spaces, only_if_in = rules.replace, rules.drop_spaces, rules.only_if_in
    if space in drop_spaces:
        raise InputError("drop_spaces must not contain the target space")
    rel = new_segment_name(space)
    with g.writer_lock.hold():
        wf: WrittenFile | None = None
        try:
            wf = write_segment(g.path, rel, array)
            with g.db.write() as c:
                _space_meta(c, space, g.path)
                keys = _upsert_items(c, list(ids), meta, contents)
                take = np.ones(len(keys), dtype=bool)
                if only_if_in is not None:
                    alive = _present(c, keys, only_if_in)
                    take = np.array([int(k) in alive for k in keys], dtype=bool)
                    if not take.all():
                        gone = [i for i, t in zip(ids, take, strict=True) if not t]
                        log.info("skipping %d items removed meanwhile: %s", len(gone), gone[:5])
                        _drop_empty_items(c, [int(k) for k, t in zip(keys, take, strict=True)
                                              if not t])
                tk = keys[take]
                if not len(tk):
                    raise _NothingToAdd
                seg = int(c.execute(
                    "INSERT INTO segments(space, file, n, rows, nbytes, sha256) "
                    "VALUES(?, ?, ?, ?, ?, ?)",
                    (space, rel, int(take.sum()), wf.rows, wf.nbytes, wf.sha256)).lastrowid or 0)
                existing = _present(c, tk, space)
                if existing and not replace:
                    names = [ids[n] for n, k in enumerate(keys) if take[n] and int(k) in existing]
                    raise InputError(f"{len(existing)} items already have a vector (or features) "
                                     f"in {space!r} (e.g. {names[:5]}); pass replace=True to "
                                     "overwrite")
                if existing:
                    c.executemany("INSERT INTO log(space, op, key) VALUES(?, 'del', ?)",
                                  [(space, k) for k in sorted(existing)])
                c.executemany(
                    "INSERT OR REPLACE INTO vectors(key, space, segment, row, n) "
                    "VALUES(?, ?, ?, ?, ?)",
                    [(int(k), space, seg, int(starts[n]), int(counts[n]))
                     for n, k in enumerate(keys) if take[n]])
                c.executemany("INSERT INTO log(space, op, key) VALUES(?, 'add', ?)",
                              [(space, int(k)) for k in tk])
                _bump(c, space, len(tk) - len(existing))
                for other in drop_spaces:
                    delete_vectors(c, [int(k) for k in tk], other)
                c.executemany("DELETE FROM failures WHERE id=? AND space=?",
                              [(ids[n], space) for n in range(len(ids)) if take[n]])
                c.executemany("DELETE FROM lost WHERE key=? AND space=?",
                              [(int(k), space) for k in tk])
        except _NothingToAdd:
            (g.path / rel).unlink(missing_ok=True)
            return np.full(len(ids), MISSING_KEY, dtype=np.int64)
        except BaseException:
            if wf is not None or (g.path / rel).exists():
                (g.path / rel).unlink(missing_ok=True)
            raise
    maybe_compact(g, space)
    return np.where(take, keys, MISSING_KEY)


class _NothingToAdd(Exception):
    pass


def write_segment(root: Path, rel: str, array: np.ndarray) -> WrittenFile:
    """Write a segment file; a full disk is a StorageError saying what to do."""
    try:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        return write_array(root, rel, array)
    except OSError as exc:
        if isinstance(exc, StorageError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        (root / rel).unlink(missing_ok=True)
        raise StorageError(
            exc.errno, f"no space left on the device of {root} writing {rel} "
            f"({array.nbytes} bytes): free disk space and re-run the command; nothing of this "
            "commit was kept (everything committed before it is)") from exc


def _drop_empty_items(c: sqlite3.Connection, keys: Sequence[int]) -> None:
    for ch in chunks(list(keys)):
        q = ",".join("?" * len(ch))
        c.execute(f"DELETE FROM items WHERE key IN ({q}) AND NOT EXISTS "
                  f"(SELECT 1 FROM vectors v WHERE v.key = items.key) AND NOT EXISTS "
                  f"(SELECT 1 FROM lost l WHERE l.key = items.key)", ch)


def add_vectors(g: Gallery, ids: Sequence[Any], vectors: Any, *, space: str,
                meta: Sequence[dict[str, Any] | None] | None = None,
                contents: Sequence[Content | None] | None = None,
                rules: AddRules = AddRules()) -> np.ndarray:
    """Validate and commit global vectors (see :meth:`Gallery.add`)."""
    ids = check_ids(ids)
    dim, kind, info = _space_meta(g.db.conn(), space, g.path)
    if kind != "global":
        raise InputError(f"space {space!r} holds local features: use add_local")
    x = check_vectors(vectors, len(ids), dim, normalized=info.get("normalized", True))
    n = len(ids)
    return add_records(g, ids, Packed(x, np.arange(n), np.ones(n, int)), space=space,
                       meta=meta, contents=contents, rules=rules)


def add_local(g: Gallery, ids: Sequence[Any], features: Sequence[LocalFeatures], *, space: str,
              meta: Sequence[dict[str, Any] | None] | None = None,
              contents: Sequence[Content | None] | None = None,
              rules: AddRules = AddRules()) -> np.ndarray:
    """Validate and commit per-item local features (see :meth:`Gallery.add_local`)."""
    ids = check_ids(ids)
    feats = list(features)
    if len(feats) != len(ids):
        raise InputError(f"{len(ids)} ids but {len(feats)} feature sets")
    dim, kind, info = _space_meta(g.db.conn(), space, g.path)
    if kind != "local":
        raise InputError(f"space {space!r} holds global vectors: use add")
    for n, f in enumerate(feats):
        if not isinstance(f, LocalFeatures):
            raise InputError(f"features[{n}] is a {type(f).__name__}, expected LocalFeatures")
        if len(f) and not np.isfinite(np.asarray(f.descriptors, np.float32)).all():
            raise InputError(f"features of {ids[n]!r} contain NaN or inf")
        if len(f) and not np.isfinite(f.keypoints).all():
            raise InputError(f"keypoints of {ids[n]!r} contain NaN or inf")
    arr, starts, counts = pack_local(feats, dim, info.get("descriptor_dtype", "float32"))
    sizes = [{"image_size": [int(f.image_size[0]), int(f.image_size[1])]} for f in feats]
    merged = [{**(meta[n] or {} if meta else {}), **sizes[n]} for n in range(len(ids))]
    return add_records(g, ids, Packed(arr, starts, counts), space=space, meta=merged,
                       contents=contents, rules=rules)


# ------------------------------------------------------------------ remove
def remove(g: Gallery, ids: Sequence[str], *, space: str | None = None) -> int:
    """Delete items (all their data) or only their data in ``space``; returns rows deleted."""
    keys = [int(k) for k in g.keys_of(list(ids)) if k != MISSING_KEY]
    if not keys:
        return 0
    removed = 0
    with g.writer_lock.hold(), g.db.write() as c:
        spaces = [space] if space is not None else \
            [r[0] for r in c.execute("SELECT space FROM spaces")]
        for sp in spaces:
            removed += delete_vectors(c, keys, sp)
        if space is None:
            for ch in chunks(keys):
                c.execute(f"DELETE FROM lost WHERE key IN ({','.join('?' * len(ch))})", ch)
        _drop_empty_items(c, keys)
    return removed


# ------------------------------------------------------------------ upkeep
def retire(c: sqlite3.Connection, paths: Sequence[str]) -> None:
    now = time.time()
    c.executemany("INSERT OR REPLACE INTO retired(path, at) VALUES(?, ?)",
                  [(p, now) for p in paths])


def sweep(g: Gallery, *, grace_s: float = RETIRE_GRACE_S, orphan_age_s: float = 600.0) -> int:
    """Delete retired files older than ``grace_s`` and unreferenced old segment files."""
    removed = 0
    with g.writer_lock.hold():
        cutoff = time.time() - grace_s
        rows = g.db.all("SELECT path FROM retired WHERE at <= ?", (cutoff,))
        for (p,) in rows:
            target = g.path / p
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            removed += 1
        if rows:
            with g.db.write() as c:
                c.executemany("DELETE FROM retired WHERE path=?", rows)
        known = {r[0] for r in g.db.all("SELECT file FROM segments")}
        known |= {r[0] for r in g.db.all("SELECT path FROM retired")}
        root = g.path / "segments"
        now = time.time()
        if root.is_dir():
            for f in root.rglob("*.npy"):
                rel = f.relative_to(g.path).as_posix()
                if rel in known:
                    continue
                try:
                    young = now - f.stat().st_mtime < orphan_age_s
                except FileNotFoundError:
                    continue
                if not young:
                    f.unlink(missing_ok=True)
                    removed += 1
    return removed


def maybe_compact(g: Gallery, space: str) -> None:
    n = g.db.one("SELECT COUNT(*) FROM segments WHERE space=?", (space,))
    if n is not None and int(n[0]) > COMPACT_SEGMENTS:
        compact_space(g, space)


def compact_space(g: Gallery, space: str) -> int:
    """Merge the space's small segments into one; the old files are retired."""
    with g.writer_lock.hold():
        with g.db.write() as c:
            empty = c.execute("SELECT segment, file FROM segments WHERE space=? AND segment NOT IN "
                              "(SELECT DISTINCT segment FROM vectors WHERE space=?)",
                              (space, space)).fetchall()
            c.executemany("DELETE FROM segments WHERE segment=?", [(r[0],) for r in empty])
            retire(c, [r[1] for r in empty])
        segs = g.db.all("SELECT segment, file, nbytes FROM segments WHERE space=? AND rows<? "
                        "ORDER BY segment", (space, LARGE_SEGMENT))
        if len(segs) <= 1:
            return len(empty)
        from galleria.store.segments import open_array

        keys_l, rows_l = [], []
        for seg, file, nbytes in segs:
            rows = np.array(g.db.all("SELECT key, row, n FROM vectors WHERE segment=? ORDER BY row",
                                     (seg,)), dtype=np.int64).reshape(-1, 3)
            arr = open_array(g.path / file, int(nbytes))
            for k, r, n in rows:
                keys_l.append(int(k))
                rows_l.append(np.asarray(arr[r : r + n]))
        counts = np.array([len(r) for r in rows_l], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        merged = np.concatenate(rows_l) if rows_l else None
        if merged is None:
            return len(empty)
        rel = new_segment_name(space)
        wf = write_segment(g.path, rel, merged)
        try:
            with g.db.write() as c:
                seg = int(c.execute(
                    "INSERT INTO segments(space, file, n, rows, nbytes, sha256) "
                    "VALUES(?, ?, ?, ?, ?, ?)",
                    (space, rel, len(keys_l), wf.rows, wf.nbytes, wf.sha256)).lastrowid or 0)
                old = [s for s, _, _ in segs]
                c.executemany("UPDATE vectors SET segment=?, row=? WHERE key=? AND space=?",
                              [(seg, int(starts[i]), k, space) for i, k in enumerate(keys_l)])
                c.execute(f"DELETE FROM segments WHERE segment IN ({','.join('?' * len(old))})",
                          old)
                retire(c, [f for _, f, _ in segs])
        except BaseException:
            (g.path / rel).unlink(missing_ok=True)
            raise
    return len(empty) + len(segs)


def save_index(g: Gallery, space: str) -> Path:
    """Save the space's current index as a new snapshot folder, recorded with checksums.

    The previous snapshot folder is retired (deleted after the grace period).
    """
    with g.writer_lock.hold():
        view = g.refresh(space, merge=True)
        base = view.base
        folder = (Path("indexes") / slug(space) /
                  f"{base.type_name}-g{view.generation}-{uuid.uuid4().hex[:8]}")
        target = g.path / folder
        base.generation = view.generation
        base.save(target)
        files = {}
        for f in sorted(target.iterdir()):
            if f.is_file():
                n, h = file_digest(f)
                files[f.name] = {"nbytes": n, "sha256": h}
        try:
            with g.db.write() as c:
                old = c.execute("SELECT folder FROM index_snapshots WHERE space=?",
                                (space,)).fetchone()
                c.execute("INSERT OR REPLACE INTO index_snapshots(space, folder, generation, "
                          "files, spec, saved) VALUES(?, ?, ?, ?, ?, ?)",
                          (space, folder.as_posix(), view.generation, json.dumps(files),
                           view.spec, time.time()))
                if old is not None and old[0] != folder.as_posix():
                    retire(c, [old[0]])
                n_log = c.execute("SELECT COUNT(*) FROM log WHERE space=? AND gen<=?",
                                  (space, view.generation)).fetchone()[0]
                if n_log > LOG_KEEP:
                    c.execute("DELETE FROM log WHERE space=? AND gen<=?", (space, view.generation))
                    c.execute("UPDATE spaces SET log_floor=? WHERE space=?",
                              (view.generation, space))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    with contextlib.suppress(OSError):
        sweep(g)
    return target
