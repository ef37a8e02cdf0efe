"""Parts of a search during a backfill: one space's part of the gallery, and its cost.

Shared by :class:`~galleria.upgrade.search.BackfillSearcher` (model upgrades and
transform changes) and :class:`~galleria.upgrade.local_search.LocalChangeSearcher`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galleria.types import SearchResult


@dataclass
class QueryCost:
    """What answering a batch of queries cost."""

    queries: int = 0
    forward_passes: dict[str, int] = field(default_factory=dict)
    map_calls: int = 0
    index_searches: int = 0
    ms: dict[str, float] = field(default_factory=dict)

    def add_ms(self, stage: str, seconds: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + 1000.0 * seconds

    def per_query(self) -> dict[str, Any]:
        q = max(self.queries, 1)
        return {
            "queries": self.queries,
            "forward_passes_per_query": sum(self.forward_passes.values()) / q,
            "forward_passes": dict(self.forward_passes),
            "map_calls_per_query": self.map_calls / q,
            "index_searches_per_query": self.index_searches / q,
            "ms_per_query": {k: round(v / q, 3) for k, v in self.ms.items()},
            "total_ms_per_query": round(sum(self.ms.values()) / q, 3),
        }


def search_excluding(q: Any, k: int, view: Any, done: Any) -> SearchResult:
    """Top-``k`` string ids of ``view`` leaving out the items ``done`` holds.

    A feature change keeps every item in the old space until ``finish``; its old
    part is the items not yet in the new space. Searched deeper (doubling) until
    every query has ``k`` such items or the space is exhausted.

    Args:
        q: queries ``view`` takes (``(Q, D)`` vectors or a list of LocalFeatures).
        view, done: :class:`~galleria.store.views.SpaceView` (or None).
    """
    nq = len(q)
    if view is None or not view.count:
        return SearchResult.empty(nq, k, object_ids=True)
    if done is None or not done.count:
        return pad_result(view.search_ids(q, min(k, view.count)), k)
    skip = done.keys()
    depth = min(view.count, 2 * k + 16)
    while True:
        res = view.search(q, depth)
        keep = ~np.isin(res.ids, skip) & (res.ids >= 0)
        if depth >= view.count or (keep.sum(axis=1) >= k).all():
            break
        depth = min(view.count, 4 * depth)
    out = SearchResult.empty(nq, k, object_ids=True)
    for r in range(nq):
        cols = np.flatnonzero(keep[r])[:k]
        out.scores[r, : cols.size] = res.scores[r, cols]
        out.ids[r, : cols.size] = view.ids.lookup(res.ids[r, cols])
    return out


def pad_result(res: SearchResult, k: int) -> SearchResult:
    if res.ids.shape[1] >= k:
        return res
    pad = SearchResult.empty(len(res), k, object_ids=True)
    pad.scores[:, : res.ids.shape[1]], pad.ids[:, : res.ids.shape[1]] = res.scores, res.ids
    return pad


