"""Space views: what a reader searches. Immutable once published.

A :class:`SpaceView` is one embedding space at one committed generation: a
*base* index (never mutated after the view is published), the keys removed from
the base since (tombstones), a small *delta* index of what was added since, and
the key -> id map. A newer view is derived from an older one by replaying the
change log into a new delta (the base is shared, untouched); when the delta or
the tombstones grow past :data:`MERGE_FRACTION` of the base, a new base is built
on a copy. Searches in flight keep the view they started with, so a reader never
sees a half-applied commit and no search path ever mutates an index.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galleria.types import MISSING_KEY, SearchResult, merge_top

log = logging.getLogger(__name__)

MERGE_MIN = 4096
"""Delta + tombstones below this size are never merged into a new base."""
MERGE_FRACTION = 0.05
"""... above this fraction of the base, the next view gets a new merged base."""


class IdMap:
    """int64 key -> string id, for the keys of one view (keys never change their id).

    A sorted base table plus a small sorted overlay of keys added since; both are
    looked up with ``searchsorted`` (no Python loop per result).
    """

    def __init__(self, keys: np.ndarray, ids: Sequence[str] | np.ndarray) -> None:
        self.keys, self.ids = _sorted_table(np.asarray(keys, dtype=np.int64), ids)
        self.extra_keys = np.zeros(0, np.int64)
        self.extra_ids = np.empty(0, dtype=object)

    def with_added(self, keys: Sequence[int], ids: Sequence[str]) -> IdMap:
        """A new map that also knows ``keys`` (merged into the base when the overlay grows)."""
        new = IdMap.__new__(IdMap)
        ek = np.concatenate([self.extra_keys, np.asarray(keys, dtype=np.int64)])
        ei = np.concatenate([self.extra_ids, np.asarray(list(ids), dtype=object)])
        if len(ek) > max(MERGE_MIN, len(self.keys) // 8):
            new.keys, new.ids = _sorted_table(np.concatenate([self.keys, ek]),
                                              np.concatenate([self.ids, ei]))
            new.extra_keys, new.extra_ids = np.zeros(0, np.int64), np.empty(0, dtype=object)
        else:
            new.keys, new.ids = self.keys, self.ids
            new.extra_keys, new.extra_ids = _sorted_table(ek, ei)
        return new

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Object array of ids (``None`` for -1 / unknown keys), same shape as ``keys``."""
        keys = np.asarray(keys, dtype=np.int64)
        out = np.full(keys.shape, None, dtype=object)
        for tk, ti in ((self.keys, self.ids), (self.extra_keys, self.extra_ids)):
            if len(tk):
                pos = np.minimum(np.searchsorted(tk, keys), len(tk) - 1)
                hit = (tk[pos] == keys) & (keys != MISSING_KEY)
                out[hit] = ti[pos[hit]]
        return out


def _sorted_table(keys: np.ndarray, ids: Sequence[str] | np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    if not len(keys):
        return np.zeros(0, np.int64), np.empty(0, dtype=object)
    order = np.argsort(keys, kind="stable")
    return keys[order], np.asarray(list(ids), dtype=object)[order]


@dataclass(frozen=True)
class KeyFilter:
    """The keys of one shard: ``key % shards == shard`` (balanced as a gallery grows,
    since keys are handed out in insertion order)."""

    shards: int
    shard: int

    def __post_init__(self) -> None:
        if self.shards < 1 or not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} of {self.shards} does not exist")

    def sql(self, column: str = "key") -> tuple[str, tuple[int, int]]:
        """A SQL condition (to append with AND) and its parameters."""
        return f"{column} % ? = ?", (self.shards, self.shard)


@dataclass(frozen=True)
class SpaceView:
    """One space of a gallery at one committed generation (immutable).

    Attributes:
        space: the model fingerprint.
        kind: ``global`` or ``local``.
        dim: vector (or descriptor) dimension.
        generation: the store generation this view reflects.
        count: items in the space at that generation.
        spec: the index spec (``exact``, ``HNSW32``...).
        base: the base index (shared with older/newer views, never mutated).
        removed: sorted int64 keys deleted from ``base`` since it was built.
        delta: index of what was added since (``None`` when empty).
        delta_keys / delta_data: the delta's contents (to derive the next delta).
        ids: key -> id map.
        keys_filter: the shard this view holds (``None``: every item).
    """

    space: str
    kind: str
    dim: int
    generation: int
    count: int
    spec: str
    base: Any
    removed: np.ndarray
    delta: Any
    delta_keys: np.ndarray
    delta_data: Any
    ids: IdMap
    params: dict[str, Any] = field(default_factory=dict)
    keys_filter: KeyFilter | None = None

    def __len__(self) -> int:
        return self.count

    @property
    def needs_merge(self) -> bool:
        small = len(self.delta_keys) + len(self.removed)
        return small > max(MERGE_MIN, MERGE_FRACTION * max(1, len(self.base)))

    def search(self, queries: Any, k: int, **kw: Any) -> SearchResult:
        """Top-``k`` int64 keys for ``queries`` (whatever the base index takes)."""
        nq = len(queries)
        if self.count == 0:
            return SearchResult.empty(nq, k)
        parts = []
        nb = len(self.base)
        if nb:
            kb = min(nb, k + len(self.removed))
            res = _search_index(self.base, queries, kb, kw)
            if len(self.removed):
                dead = np.isin(res.ids, self.removed)
                if dead.any():  # drop them, keep the order of the others
                    sc = np.where(dead, -np.inf, res.scores).astype(np.float32)
                    order = np.argsort(dead, axis=1, kind="stable")
                    res = SearchResult(np.take_along_axis(sc, order, 1),
                                       np.take_along_axis(np.where(dead, MISSING_KEY, res.ids),
                                                          order, 1))
            parts.append(res)
        if self.delta is not None and len(self.delta):
            parts.append(_search_index(self.delta, queries, min(k, len(self.delta)), kw))
        return merge_top(parts, k)

    def search_ids(self, queries: Any, k: int, **kw: Any) -> SearchResult:
        """Like :meth:`search` with string ids (``None`` for missing results)."""
        res = self.search(queries, k, **kw)
        return SearchResult(res.scores, self.ids.lookup(res.ids), self.generation)

    def keys(self) -> np.ndarray:
        """Sorted keys of every item in the view."""
        base = self.base.keys() if len(self.base) else np.zeros(0, np.int64)
        if len(self.removed):
            base = base[~np.isin(base, self.removed)]
        return np.sort(np.concatenate([base, self.delta_keys]).astype(np.int64))


def _search_index(idx: Any, queries: Any, k: int, kw: dict[str, Any]) -> SearchResult:
    funnel = kw.get("funnel")
    if funnel is not None:
        return idx.funnel_search(queries, k, shortlist_dim=funnel[0], shortlist=funnel[1],
                                 rescore_dim=kw.get("dim"))
    if kw.get("dim") is not None:
        return idx.search(queries, k, dim=kw["dim"])
    return idx.search(queries, k)


def load_any_index(path: str | os.PathLike[str], *, fingerprint: str | None = None,
                   dim: int | None = None) -> Any:
    """Load a saved global (``galleria.index``) or local-feature (``galleria.local``)
    index, dispatching on the type in its header; checks fingerprint and dim."""
    from galleria.index.base import read_header_type

    if read_header_type(path) in ("asmk", "cann"):
        from galleria.local.factory import load_local_index

        return load_local_index(path, fingerprint=fingerprint, dim=dim)
    from galleria.index.factory import load_index

    return load_index(path, fingerprint=fingerprint, dim=dim)


def copy_index(idx: Any) -> Any:
    """An independent copy of an index (``idx.copy()``, else a save/load round trip)."""
    if hasattr(idx, "copy"):
        return idx.copy()
    with tempfile.TemporaryDirectory(prefix="galleria-copy-") as tmp:
        idx.save(tmp)
        out = load_any_index(tmp)
    out.generation = idx.generation
    return out
