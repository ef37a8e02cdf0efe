"""Queries: the data a searcher searches with, per space fingerprint.

Lower than ``search`` and ``upgrade`` (both use it), so the searcher contract
(``embed_paths`` -> :class:`Queries` -> ``search``) has one definition.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.extract.embed import embed_items
from galleria.extractors.base import Extractor
from galleria.images.sources import SourceItem
from galleria.types import SearchResult


@dataclass
class QueryFailure:
    path: str
    reason: str


@dataclass
class Queries:
    """Query data per space fingerprint: ``(Q, D)`` arrays or lists of LocalFeatures."""

    data: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0

    def __getitem__(self, space: str) -> Any:
        return self.data[space]

    def __contains__(self, space: object) -> bool:
        return space in self.data

    def take(self, rows: Sequence[int]) -> Queries:
        out = {}
        for s, v in self.data.items():
            out[s] = v[list(rows)] if isinstance(v, np.ndarray) else [v[r] for r in rows]
        return Queries(out)

    @classmethod
    def of(cls, queries: Queries | Mapping[str, Any] | np.ndarray, space: str | None = None
           ) -> Queries:
        """Accept a Queries, a ``{space: data}`` mapping, or one array for ``space``."""
        if isinstance(queries, Queries):
            return queries
        if isinstance(queries, Mapping):
            return cls(dict(queries))
        if space is None:
            raise InputError("pass queries as {space fingerprint: (Q, D) array}")
        return cls({space: queries})


def embed_with(extractors: Mapping[str, Extractor], paths: Sequence[str | os.PathLike[str]], *,
               batch_size: int = 16, workers: int = 2
               ) -> tuple[Queries, list[int], list[QueryFailure]]:
    """Embed query files with each space's extractor; keep the queries all could read."""
    items = [SourceItem(id=str(p), path=Path(p)) for p in paths]
    ok_all = np.ones(len(items), dtype=bool)
    data: dict[str, Any] = {}
    fails: dict[str, QueryFailure] = {}
    for space, ext in extractors.items():
        vecs, ok, bad = embed_items(items, ext, batch_size=batch_size, workers=workers)
        data[space] = vecs
        ok_all &= ok
        for it, why in bad:
            fails[str(it.path)] = QueryFailure(str(it.path), why)
    good = [n for n, o in enumerate(ok_all) if o]
    return Queries(data).take(good), good, list(fails.values())


def search_paths(searcher: Any, paths: Sequence[str | os.PathLike[str]], k: int = 10,
                 **kw: Any) -> tuple[list[str], SearchResult | None, list[QueryFailure]]:
    """Embed ``paths`` with ``searcher`` and search (any searcher of the contract)."""
    q, good, fails = searcher.embed_paths(paths)
    if not good:
        return [], None, fails
    return [str(paths[n]) for n in good], searcher.search(q, k, **kw), fails
