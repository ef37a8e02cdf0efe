"""``.npy`` writers/readers for the ``Index._commit`` protocol (atomic, no pickle)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from galleria.errors import FormatError
from galleria.io.atomic import atomic_open, load_array


def write_array(array: np.ndarray) -> Callable[[Path], None]:
    """A writer for ``Index._commit``: ``array`` to ``path`` atomically (``.npy``)."""

    def write(path: Path) -> None:
        with atomic_open(path, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    return write


def write_bytes_file(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with atomic_open(path, "wb") as fh:
            fh.write(data)

    return write


def read_array(path: Path) -> np.ndarray:
    try:
        return load_array(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a readable .npy file: {exc}") from exc
