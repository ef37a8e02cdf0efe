"""The gallery's SQLite database: one connection per thread, explicit transactions,
and SQLite's failures turned into galleria errors that say what to do.

WAL mode gives every read transaction a consistent snapshot while one writer
commits; :meth:`Database.read` wraps several SELECTs in one such snapshot, and
:meth:`Database.write` is one ``BEGIN IMMEDIATE`` transaction (SQLite serialises
writers across processes; the busy timeout makes a second writer wait).
Connections are per thread: a transaction open in one thread is never seen,
half-done, by a query of another thread.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from galleria.errors import BusyError, FormatError, StorageError

BUSY_TIMEOUT_S = 60.0


class Database:
    """``gallery.sqlite`` of one gallery, shared safely by the threads of a process."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.conn()  # open (and check) now, in the caller's thread

    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            if self._closed:
                raise FormatError(f"{self.path}: the gallery was closed")
            c = self._connect()
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly:
                c = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                    check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            else:
                c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                    timeout=BUSY_TIMEOUT_S)
                mode = c.execute("PRAGMA journal_mode=WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise FormatError(f"{self.path}: cannot switch the database to WAL mode")
                c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            c.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        return c

    def release_thread(self) -> None:
        """Close the calling thread's connection (a worker thread that ends calls this; a
        later query of the thread opens a new one)."""
        c = getattr(self._local, "conn", None)
        if c is None:
            return
        self._local.conn = None
        with self._lock:
            self._all = [x for x in self._all if x is not c]
        _rollback(c)
        with contextlib.suppress(sqlite3.Error):
            c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(sqlite3.Error):
                c.close()
        self._local = threading.local()

    # -------------------------------------------------------------- queries
    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement in autocommit mode (or inside the thread's open transaction)."""
        try:
            return self.conn().execute(sql, params)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _transaction(self, c: sqlite3.Connection, begin: str) -> Iterator[None]:
        """``begin`` on ``c``; a failure inside rolls back (SQLite errors translated)."""
        try:
            c.execute(begin)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        try:
            yield
        except sqlite3.Error as exc:
            _rollback(c)
            raise translate(exc, self.path) from exc
        except BaseException:
            _rollback(c)
            raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every SELECT inside sees one committed state."""
        c = self.conn()
        if c.in_transaction:  # nested in this thread's own transaction
            yield c
            return
        with self._transaction(c, "BEGIN"):
            yield c
        _rollback(c)  # nothing to commit; ends the snapshot

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed when the block exits."""
        c = self.conn()
        if c.in_transaction:
            raise RuntimeError("nested write transaction")
        with self._transaction(c, "BEGIN IMMEDIATE"):
            yield c
        try:
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(c)
            raise translate(exc, self.path) from exc


def _rollback(c: sqlite3.Connection) -> None:
    if c.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            c.execute("ROLLBACK")


def translate(exc: sqlite3.Error, path: Path) -> Exception:
    """A galleria error for a SQLite failure, naming the file and what to do."""
    msg = str(exc)
    low = msg.lower()
    if "not a database" in low or "malformed" in low or "no such table" in low:
        return FormatError(
            f"{path} is damaged or not a galleria database ({msg}); run "
            f"`galleria check {path.parent}` and `galleria repair {path.parent}`"
        )
    if "locked" in low or "busy" in low:
        return BusyError(
            f"{path} stayed locked by another writer for {BUSY_TIMEOUT_S:.0f} s ({msg}); "
            "try again when the other `galleria` command has finished"
        )
    if "full" in low or "disk i/o" in low:
        return StorageError(
            errno.ENOSPC, f"{path}: the disk refused the write ({msg}); free disk space and "
            "re-run the command (the last transaction was not committed)"
        )
    if "readonly" in low or "read-only" in low:
        return StorageError(errno.EROFS, f"{path} is read-only ({msg})")
    return FormatError(f"{path}: database error: {msg}")


def chunks(seq: Sequence[Any], n: int = 500) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield list(seq[i : i + n])
