"""Segment files: immutable arrays of one space's vectors or local features.

A global space's segment is an ``(n, D)`` float32 ``.npy``; a local space's is
one ``.npy`` of records ``(kp: 4 x float32, desc: d x dtype)``, one record per
feature, each item owning a contiguous run of rows. Every segment is written
atomically (tmp + fsync + rename) and its byte size and SHA-256 are recorded in
the database by the transaction that publishes it, so damage (a deleted,
truncated or altered file) is detected instead of read as data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.io.atomic import NPY_HEADER_LOCK, atomic_open
from galleria.types import LocalFeatures

HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class WrittenFile:
    file: str
    rows: int
    nbytes: int
    sha256: str


class _HashingWriter:
    """File-like wrapper that hashes and counts what passes through it."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self.h.update(mv)
        self.fh.write(mv)
        self.n += len(mv)
        return len(mv)

    def flush(self) -> None:
        self.fh.flush()


def write_array(root: Path, rel: str, array: np.ndarray) -> WrittenFile:
    """Write ``array`` as ``root/rel`` (``.npy``) atomically; returns size and SHA-256."""
    arr = np.ascontiguousarray(array)
    with atomic_open(root / rel, "wb") as fh:
        w = _HashingWriter(fh)
        np.lib.format.write_array(w, arr, allow_pickle=False)  # type: ignore[arg-type]
    return WrittenFile(rel, int(arr.shape[0]), w.n, w.h.hexdigest())


def file_digest(path: Path) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def check_file(path: Path, nbytes: int, sha256: str | None, *, deep: bool = True) -> str | None:
    """What is wrong with a recorded file (``None`` when sound). ``deep`` hashes it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if st.st_size != nbytes:
        return f"truncated or extended: {st.st_size} bytes, {nbytes} recorded"
    if deep and sha256:
        try:
            _, got = file_digest(path)
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        if got != sha256:
            return "altered: its SHA-256 does not match the recorded one"
    return None


def open_array(path: Path, nbytes: int | None = None) -> np.ndarray:
    """Memory-map a segment (read-only); FormatError if it is missing or the wrong size."""
    try:
        if nbytes is not None and os.path.getsize(path) != nbytes:
            raise FormatError(
                f"{path} is damaged (truncated or extended: {os.path.getsize(path)} bytes, "
                f"{nbytes} recorded); run `galleria repair {_gallery_of(path)}`"
            )
        with NPY_HEADER_LOCK:  # the header parse only: the data is memory-mapped
            return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(
            f"{path} is missing (deleted?); run `galleria repair {_gallery_of(path)}`"
        ) from None
    except (ValueError, OSError) as exc:
        raise FormatError(
            f"{path} is damaged ({exc}); run `galleria repair {_gallery_of(path)}`"
        ) from exc


def _gallery_of(path: Path) -> Path:
    # <gallery>/segments/<slug>/<file>
    return Path(path).parent.parent.parent


# ---------------------------------------------------------------- local features
def local_dtype(dim: int, desc_dtype: str) -> np.dtype:
    """Record type of a local space's segment rows."""
    if desc_dtype not in ("float32", "float16", "uint8"):
        raise InputError(f"local descriptors must be float32, float16 or uint8; got {desc_dtype}")
    return np.dtype([("kp", np.float32, (4,)), ("desc", np.dtype(desc_dtype), (int(dim),))])


def pack_local(
    features: Sequence[LocalFeatures], dim: int, desc_dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-image features -> ``(records (R,), starts (N,), counts (N,))``."""
    dt = local_dtype(dim, desc_dtype)
    counts = np.array([len(f) for f in features], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out = np.zeros(int(counts.sum()), dtype=dt)
    for f, s, c in zip(features, starts, counts, strict=True):
        if c == 0:
            continue
        if f.dim != dim:
            raise InputError(f"local descriptors have dimension {f.dim}, the space holds {dim}")
        out["kp"][s : s + c] = f.keypoints
        out["desc"][s : s + c] = f.descriptors
    return out, starts, counts


def unpack_local(records: np.ndarray, start: int, n: int, image_size: Sequence[int] = (0, 0)
                 ) -> LocalFeatures:
    """The features of one item: rows ``[start, start + n)`` of a local segment."""
    part = records[start : start + n]
    return LocalFeatures(
        np.ascontiguousarray(part["kp"], dtype=np.float32),
        np.ascontiguousarray(part["desc"]),
        (int(image_size[0]), int(image_size[1])),
    )
