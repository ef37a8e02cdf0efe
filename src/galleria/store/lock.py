"""The gallery's writer lock: one writer at a time across threads and processes.

Every operation that writes files of the gallery (segment arrays, index
snapshots, deletions of retired files) holds it, together with the SQLite
transaction that publishes them. It is held per operation, not per job, so
three ``galleria index`` runs into one gallery interleave their commits. The
lock is an ``fcntl.flock`` on ``<gallery>/write.lock`` (released by the kernel
when its process dies, so a ``kill -9`` never leaves it stuck), re-entrant
within a thread, and records the holder's pid and command for the message a
waiting writer gives up with.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from galleria.errors import BusyError

LOCK_NAME = "write.lock"
DEFAULT_TIMEOUT_S = 300.0


class WriterLock:
    """Re-entrant (per thread) inter-process writer lock of one gallery folder."""

    def __init__(self, folder: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.timeout_s = float(timeout_s)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the lock for the block (waits up to ``timeout_s``, then BusyError)."""
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + limit
        if not self._thread_lock.acquire(timeout=max(0.0, limit)):
            raise BusyError(f"{self.path.parent}: another thread kept the writer lock "
                            f"for {limit:.0f} s")
        try:
            if self._depth == 0:
                self._acquire_file(deadline, limit)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release_file()
        finally:
            self._thread_lock.release()

    def _acquire_file(self, deadline: float, limit: float) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise BusyError(
                        f"gallery {self.path.parent} is busy: another writer ({holder}) has "
                        f"held its write lock for more than {limit:.0f} s; wait for it to "
                        "finish or stop it, then re-run"
                    ) from None
                time.sleep(delay)
                delay = min(0.05, delay * 2)
        with contextlib.suppress(OSError):  # who holds it, for messages (disk may be full)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n".encode())
        self._fd = fd

    def _release_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def held_by_me(self) -> bool:
        return self._depth > 0


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 300).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown process"
