"""Atomic writes: write to a temporary file beside the target, fsync, rename.

A crash at any moment leaves either the old file or the new one, never a
half-written file. The temporary file is created with ``O_CREAT | O_EXCL`` and
mode ``0o666`` under a random name, so the kernel applies the process umask
(nothing here reads or changes the umask, a process-wide setting other threads
depend on). A full disk (``ENOSPC``, ``EDQUOT``, or numpy's short write) is a
:class:`~galleria.errors.StorageError` naming the file; the temporary file is
removed and the target is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from galleria.errors import StorageError

_DISK_FULL = {errno.ENOSPC, *([errno.EDQUOT] if hasattr(errno, "EDQUOT") else [])}
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # ndarray.tofile, no errno
_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL
    | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new, empty file beside ``target``: ``.<name>.<random>.tmp``, mode ``0o666 & ~umask``."""
    for _ in range(8):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, _CREATE_FLAGS, 0o666), tmp
        except FileExistsError:  # 64 random bits taken: try another name
            continue
    raise FileExistsError(f"could not create a temporary file beside {target}")


_SQLITE_FULL = 13


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the device or the quota is full.

    Recognises ``OSError`` ``ENOSPC`` / ``EDQUOT``, numpy's short write
    (``"N requested and M written"``, no errno) and SQLite's ``SQLITE_FULL``
    (``sqlite3.OperationalError: database or disk is full``).
    """
    if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or (
        type(exc).__module__ == "sqlite3" and "database or disk is full" in str(exc)
    ):
        return True
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _DISK_FULL:
        return True
    return exc.errno is None and bool(_SHORT_WRITE.search(str(exc)))


def disk_full_error(target: str | os.PathLike[str], exc: BaseException,
                    nbytes: int | None = None) -> StorageError:
    """The :class:`StorageError` for a full disk writing ``target`` (raise it ``from exc``)."""
    quota = isinstance(exc, OSError) and exc.errno == getattr(errno, "EDQUOT", -1)
    what = "disk quota exceeded" if quota else "disk full"
    size = f"{nbytes} bytes" if nbytes is not None else "data"
    return StorageError(
        f"{what} while writing {size} to {target} ({exc}): free disk space and re-run; "
        "nothing was committed (the file is unchanged, the partial copy was removed)"
    )


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, size: int | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` atomically when the block exits cleanly.

    Args:
        path: the target file (its folder is created if needed).
        mode: ``"wb"`` or ``"w"`` (UTF-8 text).
        size: bytes the caller will write, if known (only for the disk-full message).

    Raises:
        StorageError: the disk or quota filled up; nothing replaced ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports 'wb' and 'w'")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    fh: IO[Any] | None = None
    try:
        fh = os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        if fh is None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full_error(target, exc, size) from exc
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb", size=len(data)) as fh:
        fh.write(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode()
    write_bytes(path, data + b"\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())


#: numpy parses a .npy header with ``ast.literal_eval``; CPython 3.11's AST constructor keeps
#: its recursion depth in shared state, and two threads parsing at once can fail with
#: "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905). Every
#: ``.npy`` / ``.npz`` read of the library goes through :func:`load_array` (or holds this lock).
NPY_HEADER_LOCK = threading.Lock()


def load_array(file: Any, mmap_mode: str | None = None, allow_pickle: bool = False) -> Any:
    """``np.load`` with its header parsed under :data:`NPY_HEADER_LOCK` (safe beside other
    threads' loads). A ``.npy`` path is memory-mapped under the lock (the header parse only)
    and, unless ``mmap_mode`` asks for the map, copied into memory outside it, so a large
    read never holds up the other threads. Anything else (file objects, ``.npz``, object
    arrays) is loaded under the lock; an ``.npz`` archive parses its members' headers on
    access: hold the lock around that access."""
    if isinstance(file, (str, os.PathLike)) and not allow_pickle \
            and os.fspath(file).endswith(".npy"):
        try:
            with NPY_HEADER_LOCK:
                mapped = np.load(file, mmap_mode=mmap_mode or "r", allow_pickle=False)
        except ValueError:  # not mappable (e.g. an object array): the plain load says why
            pass
        else:
            return mapped if mmap_mode else np.array(mapped)
    with NPY_HEADER_LOCK:
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=allow_pickle)


def read_npy(path: str | os.PathLike[str], *, mmap: bool = False) -> np.ndarray:
    return load_array(path, mmap_mode="r" if mmap else None)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
