"""Atomic writes: no process-wide umask flips, normal file modes, and a full disk is a
StorageError that names the file and leaves the target and no temporary file behind."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from galleria.errors import GalleriaError, StorageError
from galleria.io.atomic import atomic_open, write_bytes, write_json, write_npy


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)  # the test (not the library) sets the process umask
    try:
        yield
    finally:
        os.umask(old)


def _proc_umask() -> int | None:
    """The umask as the kernel reports it, read without changing it (Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        return None
    return None


def test_writes_never_call_umask(tmp_path, monkeypatch):
    def forbidden(*_a):
        raise AssertionError("os.umask called by an atomic write")

    monkeypatch.setattr(os, "umask", forbidden)
    write_bytes(tmp_path / "a.bin", b"123")
    write_json(tmp_path / "a.json", {"x": 1})
    write_npy(tmp_path / "a.npy", np.arange(3))
    with atomic_open(tmp_path / "a.txt", "w") as fh:
        fh.write("héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_modes_follow_the_umask(tmp_path, mask, mode):
    with _umask(mask):
        write_bytes(tmp_path / "f.bin", b"x")
        write_bytes(tmp_path / "f.bin", b"y")  # replacing keeps the normal mode
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "f.bin").read_bytes() == b"y"


def test_a_concurrent_reader_never_sees_the_umask_change(tmp_path):
    if _proc_umask() is None:
        pytest.skip("needs /proc/self/status (Linux) to read the umask without setting it")
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(_proc_umask())  # type: ignore[arg-type]

    with _umask(0o027):
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            for i in range(300):
                write_bytes(tmp_path / f"f{i % 7}.bin", b"x" * i)
        finally:
            stop.set()
            t.join(timeout=10)
    assert not t.is_alive()
    assert seen == {0o027}


def test_failed_block_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "t.bin"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write(b"new")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


@pytest.mark.parametrize("err", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError("357120 requested and 346080 written"),  # numpy's tofile: no errno
])
def test_disk_full_is_a_storage_error(tmp_path, err):
    target = tmp_path / "seg.npy"
    write_bytes(target, b"old")
    with pytest.raises(StorageError) as ei, atomic_open(target, size=357120) as fh:
        fh.write(b"partial")
        raise err
    msg = str(ei.value)
    assert str(target) in msg and "357120 bytes" in msg
    assert "free disk space and re-run" in msg and "nothing was committed" in msg
    assert ("quota" in msg) == (err.errno == errno.EDQUOT)
    assert isinstance(ei.value, GalleriaError) and ei.value.__cause__ is err
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.npy"]


def test_other_os_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError), atomic_open(tmp_path / "x") as _fh:
        raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _small_tmpfs(where: Path, size: str = "256k"):
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=30)


def test_disk_full_on_a_real_small_tmpfs(tmp_path):
    with _small_tmpfs(tmp_path / "mnt") as mnt:
        target = mnt / "vectors.npy"
        write_npy(target, np.ones((4, 8), np.float32))
        before = target.read_bytes()
        big = np.ones((1024, 128), np.float32)  # 512 KiB > 256 KiB
        with pytest.raises(StorageError) as ei:
            write_npy(target, big)
        assert str(target) in str(ei.value) and f"{big.nbytes + 128} bytes" in str(ei.value)
        # the streamed path (np.save into the file: numpy's short write, no errno)
        with pytest.raises(StorageError), atomic_open(mnt / "index.npy") as fh:
            np.save(fh, big, allow_pickle=False)
        assert target.read_bytes() == before
        assert sorted(p.name for p in mnt.iterdir()) == ["vectors.npy"]  # temp files removed
        write_bytes(mnt / "small.bin", b"x" * 1000)  # the space came back


def test_sqlite_disk_full_is_recognised(tmp_path):
    """The store translates SQLITE_FULL with the same helpers (real: a tiny tmpfs)."""
    import sqlite3

    from galleria.io.atomic import disk_full_error, is_disk_full

    with _small_tmpfs(tmp_path / "mnt", size="64k") as mnt:
        conn = sqlite3.connect(mnt / "db.sqlite")
        conn.execute("CREATE TABLE t(x BLOB)")
        with pytest.raises(sqlite3.OperationalError) as ei:
            for _ in range(100):
                conn.execute("INSERT INTO t VALUES(?)", (b"x" * 4096,))
                conn.commit()
        conn.close()
    assert is_disk_full(ei.value)
    err = disk_full_error(mnt / "db.sqlite", ei.value)
    assert "db.sqlite" in str(err) and "free disk space" in str(err)
    assert not is_disk_full(sqlite3.OperationalError("no such table: t"))


def test_concurrent_writers_of_one_file(tmp_path):
    """8 threads replace one file 50 times each: every read sees one whole write,
    no write fails, no temporary file is left."""
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * (1000 + 97 * i) for i in range(8)]
    write_bytes(target, payloads[0])
    errors: list[BaseException] = []
    torn: list[int] = []
    stop = threading.Event()

    def writer(i: int) -> None:
        try:
            for _ in range(50):
                write_bytes(target, payloads[i])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in payloads:
                torn.append(len(data))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    r.join(timeout=10)
    assert not any(t.is_alive() for t in [*threads, r])
    assert not errors and not torn
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_load_array_waits_for_the_npy_header_lock(tmp_path):
    """Every .npy read parses its header under one lock (numpy's header parse is not
    thread-safe on CPython 3.11): a load waits while another thread holds it."""
    from galleria.io.atomic import NPY_HEADER_LOCK, load_array

    p = tmp_path / "a.npy"
    write_npy(p, np.arange(6, dtype=np.float32).reshape(2, 3))
    got: list = []
    with NPY_HEADER_LOCK:
        t = threading.Thread(target=lambda: got.append(load_array(p, mmap_mode="r")))
        t.start()
        time.sleep(0.2)
        assert got == []  # blocked on the lock
    t.join(timeout=10)
    assert not t.is_alive()
    np.testing.assert_array_equal(got[0], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_load_array_copies_npy_outside_the_lock(tmp_path):
    """A plain (not memory-mapped) load returns an in-memory copy equal to np.load's, and
    the lock is free again afterwards."""
    from galleria.io.atomic import NPY_HEADER_LOCK, load_array

    p = tmp_path / "b.npy"
    a = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    write_npy(p, a)
    got = load_array(p)
    assert not isinstance(got, np.memmap) and got.flags.writeable
    np.testing.assert_array_equal(got, np.load(p))
    assert isinstance(load_array(p, mmap_mode="r"), np.memmap)
    assert NPY_HEADER_LOCK.acquire(blocking=False)
    NPY_HEADER_LOCK.release()
