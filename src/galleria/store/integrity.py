"""Integrity of a gallery: ``check`` finds damage, ``repair`` undoes it.

``check`` verifies the database (SQLite ``quick_check``), every segment file and
every saved index snapshot against the byte size and SHA-256 recorded when they
were written, the bookkeeping (counts, row ranges) and names the items each
damaged file holds. ``repair``:

1. restores a damaged or missing database from ``gallery.sqlite.backup`` (made
   after every finished job; the damaged one is kept aside);
2. takes damaged segments out of the store (their items leave search at once),
   re-embeds those items from their stored image paths with the space's own
   extractor (rebuilt from its config), and records the ones whose images are
   gone too as *lost* (kept out of search, listed by ``check``, removable);
3. drops damaged index snapshots, recounts, rebuilds and saves every index.
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
from galleria.images.sources import SourceItem
from galleria.store.db import chunks
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
    lost = g.db.all("SELECT l.space, i.id, l.reason FROM lost l JOIN items i ON i.key=l.key "
                    "ORDER BY l.space, i.key")
    by_space: dict[str, list[tuple[str, str]]] = {}
    for space, i, why in lost:
        by_space.setdefault(space, []).append((i, why))
    for space, entries in by_space.items():
        probs.append(Problem("lost", str(g.path), f"{len(entries)} items lost their data and "
                             f"could not be re-made ({entries[0][1]}); remove them with "
                             f"`galleria remove` or restore their images and run repair",
                             space, [e[0] for e in entries], len(entries)))
    return CheckReport(str(g.path), probs, len(segs), len(snaps), len(g))


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
    data was in a damaged file are recorded as lost."""
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
        todo: dict[str, list[int]] = {}
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
                c.execute("DELETE FROM segments WHERE segment=?", (seg[0],))
                retire(c, [rel])
                _recount(c, p.space)
            todo.setdefault(p.space, []).extend(keys)
            rep.dropped_segments.append(p.path)
        with g.db.write() as c:
            for p in report.problems:
                if p.what == "bookkeeping" and p.space is not None:
                    _recount(c, p.space)
                    rep.recounted.append(p.space)
    for space, keys in todo.items():
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


def _recount(c: sqlite3.Connection, space: str) -> None:
    n = c.execute("SELECT COUNT(*) FROM vectors WHERE space=?", (space,)).fetchone()[0]
    gen = c.execute("SELECT MAX(gen) FROM log WHERE space=?", (space,)).fetchone()[0] or 0
    c.execute("UPDATE spaces SET count=?, generation=? WHERE space=?", (int(n), int(gen), space))


def _reembed(g: Gallery, space: str, keys: list[int], reembed: Reembed | None
             ) -> tuple[int, list[str]]:
    """Re-make the data of ``keys`` in ``space`` from their images; returns (done, lost ids)."""
    ids = [str(i) for i in g.ids_of(np.array(keys, np.int64))]
    metas = g.meta(ids)
    lost: list[tuple[int, str, str]] = []
    items: list[SourceItem] = []
    key_of = dict(zip(ids, keys, strict=True))
    for i, m in zip(ids, metas, strict=True):
        path = (m or {}).get("path")
        if reembed is None:
            lost.append((key_of[i], i, "re-embedding was not asked for"))
        elif not path or not Path(path).is_file():
            lost.append((key_of[i], i, f"its image {path or '(no path recorded)'} is gone"))
        else:
            box = (m or {}).get("bbox")
            items.append(SourceItem(id=i, path=Path(path),
                                    bbox=tuple(box) if isinstance(box, list) else None))
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
        with g.db.write() as c:
            c.executemany("INSERT OR REPLACE INTO lost(key, space, reason, at) VALUES(?,?,?,?)",
                          [(k, space, why, now) for k, _, why in lost])
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
