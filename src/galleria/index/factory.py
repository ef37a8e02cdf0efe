"""Build an index from a spec string and load any saved index by its header type."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from galleria.errors import FormatError
from galleria.index.base import HEADER_NAME, Index
from galleria.io.atomic import read_json


def create_index(spec: str, dim: int, *, fingerprint: str | None = None, **params: Any) -> Index:
    """``"exact"`` -> :class:`ExactIndex`; anything else is a FAISS factory string."""
    if spec.strip().lower() == "exact":
        from galleria.index.exact import ExactIndex

        return ExactIndex(dim, fingerprint=fingerprint, **params)
    from galleria.index.faiss_index import FaissIndex

    return FaissIndex(spec, dim, fingerprint=fingerprint, **params)


def load_index(
    path: str | os.PathLike[str], *, fingerprint: str | None = None, dim: int | None = None
) -> Index:
    """Load an index saved by ``Index.save``, dispatching on its header's type."""
    p = Path(path)
    header_path = p / HEADER_NAME
    if not header_path.is_file():
        raise FormatError(f"{p} holds no saved index ({HEADER_NAME} missing)")
    try:
        kind = read_json(header_path).get("type")
    except ValueError as exc:
        raise FormatError(f"{header_path} is not valid JSON: {exc}") from exc
    if kind == "exact":
        from galleria.index.exact import ExactIndex

        return ExactIndex.load(p, fingerprint=fingerprint, dim=dim)
    if kind == "faiss":
        from galleria.index.faiss_index import FaissIndex

        return FaissIndex.load(p, fingerprint=fingerprint, dim=dim)
    raise FormatError(f"{header_path}: unknown index type {kind!r}")
