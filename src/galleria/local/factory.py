"""Build or load a local-feature index by name (``asmk``, ``cann``)."""

from __future__ import annotations

import os
from typing import Any

from galleria.errors import FormatError, InputError
from galleria.index.base import read_header_type
from galleria.local.asmk import AsmkIndex
from galleria.local.base import LocalIndex
from galleria.local.cann import CannIndex

LOCAL_INDEXES = ("asmk", "cann")


def _classes() -> dict[str, type[LocalIndex]]:
    return {"asmk": AsmkIndex, "cann": CannIndex}


def local_index_kind(spec: str) -> str:
    """The local index a local space's ``index_spec`` names (``exact``, the store's
    default spec, means the default: ``asmk``)."""
    s = str(spec).strip().lower()
    if s in ("", "exact", "default"):
        return "asmk"
    if s not in LOCAL_INDEXES:
        raise InputError(f"a local space is indexed by {' or '.join(LOCAL_INDEXES)}; got {spec!r}")
    return s


def create_local_index(kind: str, dim: int, *, fingerprint: str | None = None,
                       **params: Any) -> LocalIndex:
    """A new, untrained local index (``add`` trains it on its first batch)."""
    cls = _classes().get(kind)
    if cls is None:
        raise InputError(f"unknown local index {kind!r}; known: {', '.join(LOCAL_INDEXES)}")
    try:
        return cls(dim, fingerprint=fingerprint, **params)
    except TypeError as exc:
        raise InputError(f"{kind}: bad parameters {sorted(params)}: {exc}") from exc


def load_local_index(path: str | os.PathLike[str], *, fingerprint: str | None = None,
                     dim: int | None = None) -> LocalIndex:
    """Load a saved local index, dispatching on its header's type."""
    kind = read_header_type(path)
    cls = _classes().get(kind)
    if cls is None:
        raise FormatError(f"{path} holds a {kind!r} index, not a local-feature index")
    return cls.load(path, fingerprint=fingerprint, dim=dim)
