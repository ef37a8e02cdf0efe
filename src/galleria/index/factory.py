"""Build or load an index from one spec string.

``create_index("exact", 768)`` is our own exact kernel (:class:`ExactIndex`),
``"exact-bf16"`` / ``"exact-int8"`` the same results scored on a compressed copy;
any other spec is a FAISS factory string (``"HNSW32"``, ``"IVF1024,Flat"``,
``"OPQ16,IVF1024,PQ16"`` ...) served by :class:`FaissIndex`.
``load_index(path)`` dispatches on the ``type`` recorded in ``header.json``.
"""

from __future__ import annotations

import os
from typing import Any

from galleria.errors import FormatError, InputError
from galleria.index.adaptive import PrefixIndex
from galleria.index.base import Index, read_header_type
from galleria.index.compressed import ExactBf16Index, ExactInt8Index
from galleria.index.exact import ExactIndex
from galleria.index.faiss_index import FaissIndex

_TYPES: dict[str, type[Index]] = {
    cls.type_name: cls
    for cls in (ExactIndex, FaissIndex, PrefixIndex, ExactBf16Index, ExactInt8Index)
}


def create_index(spec: str, dim: int, *, fingerprint: str | None = None, **params: Any) -> Index:
    """A new empty index.

    Args:
        spec: ``"exact"``, ``"exact-bf16"`` / ``"exact-int8"`` (exact results, scored on a
            compressed copy, see :mod:`galleria.index.compressed`), ``"prefix"`` (exact,
            searchable at any prefix size or by funnel: for nested embeddings) or a FAISS
            factory string.
        dim: vector dimension D.
        fingerprint: model fingerprint recorded in the index and checked on load.
        **params: backend parameters: ``max_batch_bytes`` (exact); ``shortlist``,
            ``source``, ``scratch_dir`` (exact-bf16 / exact-int8); ``nprobe``,
            ``ef_search``, ``rescore``, ``rebuild_fraction`` (FAISS).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"index spec must be 'exact' or a FAISS factory string; got {spec!r}")
    try:
        if spec.strip().lower() == "exact":
            return ExactIndex(dim, fingerprint=fingerprint, **params)
        if spec.strip().lower() == "prefix":
            return PrefixIndex(dim, fingerprint=fingerprint, **params)
        compressed = {"exact-bf16": ExactBf16Index, "exact-int8": ExactInt8Index}
        if spec.strip().lower() in compressed:
            return compressed[spec.strip().lower()](dim, fingerprint=fingerprint, **params)
        return FaissIndex(spec, dim, fingerprint=fingerprint, **params)
    except TypeError as exc:  # unknown keyword for this backend
        raise InputError(f"index {spec!r}: {exc}") from exc


def load_index(
    path: str | os.PathLike[str], *, fingerprint: str | None = None, dim: int | None = None
) -> Index:
    """Load an index saved with ``save(path)``; checks fingerprint and dim when given."""
    kind = read_header_type(path)
    cls = _TYPES.get(kind)
    if cls is None:
        known = sorted(_TYPES)
        raise FormatError(f"{path} holds an index of unknown type {kind!r} (known: {known})")
    return cls.load(path, fingerprint=fingerprint, dim=dim)
