"""Integrity of a gallery: ``check`` finds damage, ``repair`` undoes it.

``check`` verifies the database (SQLite ``quick_check``), every segment file and
every saved index snapshot against the byte size and SHA-256 recorded when they
were written, the bookkeeping (counts, row ranges), names the items each
damaged file holds, and lists items that are lost, hold no data at all, or whose
image file cannot be found. ``repair``:

1. restores a damaged or missing database from ``gallery.sqlite.backup`` (made
   after every finished job; the damaged one is kept aside);
2. takes damaged segments out of the store (their items leave search at once)
   and, in the same transaction, records each of their items as pending in the
   ``lost`` table (a write-ahead record: a repair killed later leaves them
   listed, never silently gone);
3. re-embeds every item the ``lost`` table holds from its stored image with the
   space's own extractor (rebuilt from its config); each committed batch clears
   its records; the items whose images are gone stay *lost* with the reason
   (kept out of search, listed by ``check``, removable);
4. drops damaged index snapshots, recounts, rebuilds and saves every index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from galleria.errors import FormatError, GalleriaError, InputError
from galleria.images.decode import parse_bbox
from galleria.images.sources import SourceItem
from galleria.store.db import chunks
from galleria.store.images import resolve_image_path
from galleria.store.schema import BACKUP, DB
from galleria.store.segments import check_file
from galleria.store.writes import delete_vectors, retire

if TYPE_CHECKING:
    from galleria.store.gallery import Gallery

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """One damaged thing: a file (or the database) and what it affects."""

    what: str            # "database", "segment", "index", "bookkeeping", "lost"
    path: str
    problem: str
    space: str | None = None
    items: list[str] = field(default_factory=list)
    n_items: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "path": self.path, "problem": self.problem,
                "space": self.space, "n_items": self.n_items, "items": self.items[:50]}


@dataclass
class CheckReport:
    gallery: str
    problems: list[Problem]
    segments: int = 0
    snapshots: int = 0
    items: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"gallery": self.gallery, "ok": self.ok, "segments_checked": self.segments,
                "snapshots_checked": self.snapshots, "items": self.items,
                "problems": [p.to_dict() for p in self.problems]}


def check(g: Gallery, *, deep: bool = True) -> CheckReport:
    """Verify the gallery; ``deep`` hashes every file (else sizes only)."""
    probs: list[Problem] = []
    rows = g.db.all("PRAGMA quick_check")
    if [r[0] for r in rows] != ["ok"]:
        probs.append(Problem("database", str(g.db.path), "; ".join(str(r[0]) for r in rows[:5])))
    segs = g.db.all("SELECT segment, space, file, rows, nbytes, sha256 FROM segments")
    for seg, space, file, nrows, nbytes, sha in segs:
        problem = check_file(g.path / file, int(nbytes), sha, deep=deep)
        bad_rows = g.db.one("SELECT COUNT(*) FROM vectors WHERE segment=? AND row + n > ?",
                            (seg, int(nrows)))
        if problem is None and bad_rows and bad_rows[0]:
            problem = f"{bad_rows[0]} items point past its {nrows} rows"
        if problem:
            ids = [r[0] for r in g.db.all("SELECT i.id FROM vectors v JOIN items i ON "
                                          "i.key=v.key WHERE v.segment=? ORDER BY i.key", (seg,))]
            probs.append(Problem("segment", str(g.path / file), problem, space, ids, len(ids)))
    snaps = g.db.all("SELECT space, folder, files FROM index_snapshots")
    for space, folder, files in snaps:
        for name, meta in json.loads(files).items():
            problem = check_file(g.path / folder / name, int(meta["nbytes"]), meta.get("sha256"),
                                 deep=deep)
            if problem:
                probs.append(Problem("index", str(g.path / folder / name), problem, space))
    for space, count in g.db.all("SELECT space, count FROM spaces"):
        real = g.db.one("SELECT COUNT(*) FROM vectors WHERE space=?", (space,))
        if real and int(real[0]) != int(count):
            probs.append(Problem("bookkeeping", str(g.db.path),
                                 f"space count {count} but {real[0]} items hold data", space))
    probs.extend(_lost_problems(g))
    probs.extend(_orphan_problems(g))
    probs.extend(_image_problems(g))
    return CheckReport(str(g.path), probs, len(segs), len(snaps), len(g))


PENDING = ("re-embedding by `galleria repair` did not finish (interrupted?): run "
           "`galleria repair` again")
"""The reason recorded, in the same transaction that takes an item's damaged data out
of the store, for every item ``repair`` is about to re-make (its write-ahead
record): an interrupted repair leaves them listed, never silently gone."""
ORPHAN = "held no data in any space and was not recorded as lost"


def _lost_problems(g: Gallery) -> list[Problem]:
    lost = g.db.all("SELECT l.space, i.id, l.reason FROM lost l JOIN items i ON i.key=l.key "
                    "ORDER BY l.space, i.key")
    by_space: dict[tuple[str, bool], list[tuple[str, str]]] = {}
    for space, i, why in lost:
        by_space.setdefault((space, why == PENDING), []).append((i, why))
    out = []
    for (space, pending), entries in by_space.items():
        if pending:
            msg = (f"{len(entries)} items are being re-made by `galleria repair`, or a repair "
                   "was interrupted: run `galleria repair` to finish it")
        else:
            msg = (f"{len(entries)} items lost their data and could not be re-made "
                   f"({entries[0][1]}); remove them with `galleria remove` or restore their "
                   "images and run `galleria repair`")
        out.append(Problem("lost", str(g.path), msg, space, [e[0] for e in entries],
                           len(entries)))
    return out


def _orphans(c: sqlite3.Connection) -> list[tuple[int, str]]:
    """``(key, id)`` of items that hold no data in any space and are not recorded as lost
    (data lost silently, e.g. by a repair of galleria <= 0.2 killed while re-embedding)."""
    return [(int(k), str(i)) for k, i in c.execute(
        "SELECT i.key, i.id FROM items i WHERE NOT EXISTS (SELECT 1 FROM vectors v WHERE "
        "v.key = i.key) AND NOT EXISTS (SELECT 1 FROM lost l WHERE l.key = i.key) "
        "ORDER BY i.key")]


def _orphan_problems(g: Gallery) -> list[Problem]:
    with g.db.read() as c:
        orphans = _orphans(c)
    if not orphans:
        return []
    return [Problem("orphan", str(g.db.path),
                    f"{len(orphans)} items hold no data in any space and are not recorded as "
                    "lost: run `galleria repair` to re-make them from their images",
                    None, [i for _, i in orphans], len(orphans))]


def _image_problems(g: Gallery, batch: int = 4096) -> list[Problem]:
    """Items (not already lost) whose recorded image file cannot be found: ``upgrade run``
    and ``repair`` could not re-embed them, the service shows no thumbnail."""
    missing: list[str] = []
    first = ""
    last = -1
    while True:
        rows = g.db.all("SELECT i.key, i.id, i.meta FROM items i WHERE i.key > ? AND NOT EXISTS "
                        "(SELECT 1 FROM lost l WHERE l.key = i.key) ORDER BY i.key LIMIT ?",
                        (last, batch))
        if not rows:
            break
        last = int(rows[-1][0])
        for _, i, m in rows:
            try:
                stored = json.loads(m).get("path")
            except (ValueError, AttributeError):
                stored = None
            if not stored:
                continue  # nothing recorded (vectors added through the API): nothing to find
            path = resolve_image_path(g.path, stored)
            if path is None or not os.path.isfile(path):
                missing.append(i)
                first = first or str(path)
    if not missing:
        return []
    return [Problem("image", str(g.path),
                    f"{len(missing)} items' images cannot be found (first: {first}): "
                    "`galleria repair` and `galleria upgrade run` could not re-embed them; "
                    "restore the files, or remove the items with `galleria remove`",
                    None, missing, len(missing))]


# ------------------------------------------------------------------ repair
@dataclass
class RepairReport:
    gallery: str
    restored_database: str | None = None
    dropped_segments: list[str] = field(default_factory=list)
    reembedded: dict[str, int] = field(default_factory=dict)
    lost: dict[str, list[str]] = field(default_factory=dict)
    dropped_snapshots: list[str] = field(default_factory=list)
    rebuilt_indexes: list[str] = field(default_factory=list)
    recounted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"gallery": self.gallery, "restored_database": self.restored_database,
                "dropped_segments": self.dropped_segments, "reembedded": self.reembedded,
                "lost": {k: v[:50] for k, v in self.lost.items()},
                "lost_counts": {k: len(v) for k, v in self.lost.items()},
                "dropped_snapshots": self.dropped_snapshots,
                "rebuilt_indexes": self.rebuilt_indexes, "recounted": self.recounted}


def restore_database(path: str | os.PathLike[str]) -> str | None:
    """If the database of gallery ``path`` is missing or damaged, restore its backup.

    Returns a description of what was done (``None`` when the database is sound).
    Raises FormatError when it is damaged and there is no backup.
    """
    p = Path(path)
    db = p / DB
    problem = _db_problem(db)
    if problem is None:
        return None
    backup = p / BACKUP
    if not backup.is_file() or _db_problem(backup) is not None:
        raise FormatError(
            f"{db} is damaged ({problem}) and there is no usable backup ({backup}); the "
            f"vectors cannot be matched to their items any more: re-index the images with "
            f"`galleria index SRC --out {p}` into a new gallery")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        f = Path(f"{db}{suffix}")
        if f.exists():
            f.rename(Path(f"{db}.damaged-{stamp}{suffix}"))
    tmp = p / f".{DB}.restore"
    shutil.copyfile(backup, tmp)
    os.replace(tmp, db)
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(backup.stat().st_mtime))
    return (f"{db} was damaged ({problem}); restored the backup taken {taken} (the damaged "
            f"file is kept as {db.name}.damaged-{stamp}). Items committed after the backup "
            "are not in it: re-run the `galleria index` commands since then")


def _db_problem(db: Path) -> str | None:
    if not db.is_file():
        return "missing"
    if db.stat().st_size == 0:
        return "empty file"
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = c.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in rows] != ["ok"]:
                return "; ".join(str(r[0]) for r in rows[:3])
            if c.execute("SELECT 1 FROM sqlite_master WHERE name='spaces'").fetchone() is None:
                return "no gallery tables"
        finally:
            c.close()
    except sqlite3.Error as exc:
        return str(exc)
    return None


Reembed = Callable[[Any, list[SourceItem]], Iterator[Any]]
"""``reembed(space_info, items)`` yields batches (``.items``, ``.vectors`` or
``.features``, ``.failures``) of the items' data re-made from their images
(:func:`galleria.extract.repair.repair` provides one from the space's config)."""


def repair(g: Gallery, *, reembed: Reembed | None = None) -> RepairReport:
    """Repair ``g`` in place (see the module docstring); call :func:`restore_database`
    first when the database itself may be damaged. Without ``reembed``, items whose
    data was in a damaged file are recorded as lost.

    Safe to kill at any point: the transaction that takes a damaged segment out of the
    store also records each of its items as *pending* in the ``lost`` table (a
    write-ahead record); each re-embedded batch clears its items' records in the
    transaction that stores their new data. A killed repair therefore leaves the rest
    listed (``check`` reports them) and the next ``repair`` re-makes every item the
    ``lost`` table holds -- also earlier lost items whose images are back.
    """
    g._check_writable()
    rep = RepairReport(str(g.path))
    report = check(g, deep=True)
    with g.writer_lock.hold():
        for p in report.problems:
            if p.what == "index" and p.space is not None:
                with g.db.write() as c:
                    row = c.execute("SELECT folder FROM index_snapshots WHERE space=?",
                                    (p.space,)).fetchone()
                    c.execute("DELETE FROM index_snapshots WHERE space=?", (p.space,))
                    if row:
                        retire(c, [row[0]])
                rep.dropped_snapshots.append(p.path)
        for p in report.problems:
            if p.what != "segment" or p.space is None:
                continue
            rel = Path(p.path).relative_to(g.path).as_posix()
            with g.db.write() as c:
                seg = c.execute("SELECT segment FROM segments WHERE file=?", (rel,)).fetchone()
                if seg is None:
                    continue
                keys = [r[0] for r in c.execute("SELECT key FROM vectors WHERE segment=?",
                                                (seg[0],))]
                for ch in chunks(keys):
                    c.execute(f"DELETE FROM vectors WHERE space=? AND segment=? AND key IN "
                              f"({','.join('?' * len(ch))})", (p.space, seg[0], *ch))
                c.executemany("INSERT INTO log(space, op, key) VALUES(?, 'del', ?)",
                              [(p.space, k) for k in keys])
                _mark(c, p.space, keys, PENDING)  # the write-ahead record, same transaction
                c.execute("DELETE FROM segments WHERE segment=?", (seg[0],))
                retire(c, [rel])
                _recount(c, p.space)
            rep.dropped_segments.append(p.path)
        with g.db.write() as c:
            orphans = _orphans(c)
            home = _home_space(c)
            if orphans and home is not None:
                log.warning("%d items held no data in any space: re-making them in %s",
                            len(orphans), home)
                _mark(c, home, [k for k, _ in orphans], PENDING)
            for p in report.problems:
                if p.what == "bookkeeping" and p.space is not None:
                    _recount(c, p.space)
                    rep.recounted.append(p.space)
    todo: dict[str, list[int]] = {}
    for space, key, why in g.db.all("SELECT space, key, reason FROM lost ORDER BY space, key"):
        if reembed is not None or why == PENDING:  # without re-embedding, older reasons stay
            todo.setdefault(space, []).append(int(key))
    for space, keys in todo.items():
        if not g.has_space(space):
            continue
        done, lost = _reembed(g, space, keys, reembed)
        rep.reembedded[space] = done
        if lost:
            rep.lost[space] = lost
    for s in g.spaces():
        if s.count:
            g.build_index(s.space, save=True)
            rep.rebuilt_indexes.append(s.space)
    with contextlib.suppress(GalleriaError, OSError):
        g.backup()
    return rep


def _mark(c: sqlite3.Connection, space: str, keys: list[int], reason: str) -> None:
    now = time.time()
    c.executemany("INSERT OR REPLACE INTO lost(key, space, reason, at) VALUES(?,?,?,?)",
                  [(int(k), space, reason, now) for k in keys])


def _home_space(c: sqlite3.Connection) -> str | None:
    """Where an item that lost all its data is re-made: the primary space, else the
    oldest space."""
    row = c.execute("SELECT value FROM settings WHERE key='primary_space'").fetchone()
    if row is not None:
        space = json.loads(row[0])
        if c.execute("SELECT 1 FROM spaces WHERE space=?", (space,)).fetchone():
            return str(space)
    row = c.execute("SELECT space FROM spaces ORDER BY created LIMIT 1").fetchone()
    return None if row is None else str(row[0])


def _recount(c: sqlite3.Connection, space: str) -> None:
    n = c.execute("SELECT COUNT(*) FROM vectors WHERE space=?", (space,)).fetchone()[0]
    gen = c.execute("SELECT MAX(gen) FROM log WHERE space=?", (space,)).fetchone()[0] or 0
    c.execute("UPDATE spaces SET count=?, generation=? WHERE space=?", (int(n), int(gen), space))


def _reembed(g: Gallery, space: str, keys: list[int], reembed: Reembed | None
             ) -> tuple[int, list[str]]:
    """Re-make the data of ``keys`` in ``space`` from their images; returns (done, lost ids).

    Each committed batch clears its items' ``lost`` records (in the same transaction);
    the others get the reason they could not be re-made.
    """
    found = g.ids_of(np.array(keys, np.int64))
    key_of = {str(i): int(k) for i, k in zip(found, keys, strict=True) if i is not None}
    ids = list(key_of)  # items removed meanwhile are left out
    metas = g.meta(ids)  # image paths resolved against the gallery
    lost: list[tuple[int, str, str]] = []
    items: list[SourceItem] = []
    for i, m in zip(ids, metas, strict=True):
        path = (m or {}).get("path")
        if reembed is None:
            lost.append((key_of[i], i, "re-embedding was not asked for"))
            continue
        if not path or not Path(path).is_file():
            lost.append((key_of[i], i, f"its image {path or '(no path recorded)'} is gone"))
            continue
        try:
            box = parse_bbox((m or {}).get("bbox"))
        except InputError as exc:
            lost.append((key_of[i], i, f"its stored crop box is invalid ({exc})"))
            continue
        items.append(SourceItem(id=i, path=Path(path), bbox=box))
    done = 0
    if items and reembed is not None:
        info = g.space_info(space)
        for batch in reembed(info, items):
            for it, why in batch.failures:
                lost.append((key_of[it.id], it.id, f"its image cannot be read: {why}"))
            if not batch.items:
                continue
            bids = [it.id for it in batch.items]
            feats = getattr(batch, "features", None)
            if feats is None and isinstance(batch.vectors, list):
                feats = batch.vectors
            if info.kind == "local" and feats is not None:
                g.add_local(bids, feats, space=space, replace=True)
            else:
                g.add(bids, batch.vectors, space=space, replace=True)
            done += len(bids)
    if lost:
        now = time.time()
        with g.writer_lock.hold(), g.db.write() as c:
            c.executemany("INSERT OR REPLACE INTO lost(key, space, reason, at) SELECT ?, ?, ?, ? "
                          "WHERE EXISTS (SELECT 1 FROM items WHERE key = ?)",
                          [(k, space, why, now, k) for k, _, why in lost])
    return done, [i for _, i, _ in lost]


# ------------------------------------------------------------------ misc
def backup(g: Gallery) -> Path:
    """Copy the database into ``gallery.sqlite.backup`` (consistent, atomic)."""
    target = g.path / BACKUP
    # a name of its own: processes finishing jobs at once never write one file
    tmp = g.path / f".{BACKUP}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    for old in g.path.glob(f".{BACKUP}.*.tmp"):  # left by a killed backup
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink()
    dst = sqlite3.connect(tmp)
    try:
        g.db.conn().backup(dst)
    except sqlite3.Error as exc:
        dst.close()
        tmp.unlink(missing_ok=True)
        raise FormatError(f"cannot back up {g.db.path}: {exc}") from exc
    dst.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    return target


def drop_space(g: Gallery, space: str, *, force: bool = False) -> int:
    """Delete ``space``: its data rows (retiring files), snapshot, log, failures, settings."""
    info = g.space_info(space)
    if info.count and not force:
        raise InputError(f"space {space!r} still holds {info.count} items (pass force=True)")
    with g.writer_lock.hold(), g.db.write() as c:
        n = delete_vectors(c, [r[0] for r in c.execute(
            "SELECT key FROM vectors WHERE space=?", (space,))], space)
        files = [r[0] for r in c.execute("SELECT file FROM segments WHERE space=?", (space,))]
        snap = c.execute("SELECT folder FROM index_snapshots WHERE space=?", (space,)).fetchone()
        retire(c, files + ([snap[0]] if snap else []))
        for table in ("segments", "log", "failures", "index_snapshots", "lost"):
            c.execute(f"DELETE FROM {table} WHERE space=?", (space,))
        c.execute("DELETE FROM spaces WHERE space=?", (space,))
        c.execute("DELETE FROM items WHERE NOT EXISTS (SELECT 1 FROM vectors v WHERE "
                  "v.key = items.key) AND NOT EXISTS (SELECT 1 FROM lost l WHERE "
                  "l.key = items.key)")
        prim = c.execute("SELECT value FROM settings WHERE key='primary_space'").fetchone()
        if prim is not None and json.loads(prim[0]) == space:
            row = c.execute("SELECT space FROM spaces WHERE kind='global' ORDER BY created"
                            ).fetchone()
            if row is None:
                c.execute("DELETE FROM settings WHERE key='primary_space'")
            else:
                c.execute("UPDATE settings SET value=? WHERE key='primary_space'",
                          (json.dumps(row[0]),))
    g._views.pop(space, None)
    return n
