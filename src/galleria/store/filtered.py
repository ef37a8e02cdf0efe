"""Filtered search: the top-k of the items that satisfy a payload filter, exactly.

Two strategies, chosen per search by :func:`choose_strategy` from how many items
match (``m``) out of the space's ``n``:

- **pre-filter** (``m`` small): fetch the ``m`` matching items' vectors from the
  store's segment files and scan just those (an exact top-k over the subset,
  whatever the space's index). Cost grows with ``m``, not ``n``.
- **post-filter** (``m`` large): search the space's index for ``k' =
  (k + 3 sqrt(k) + 3) n / m + 16`` results (:func:`overfetch`) and keep the
  matching ones. A query with fewer than ``k`` matching among its ``k'`` is
  searched again with 4x as many (only those queries), at most
  :data:`MAX_ROUNDS` rounds in all, then the pre-filter answers it. With an
  exact index the result equals the pre-filter's: the matching items among the
  global top-``k'`` are the top matching items.
  Cost is one index search (for an exact index about the unfiltered cost).

The rule is ``pre-filter when m <= max(PREFILTER_MIN, PREFILTER_FRACTION * n)``,
else post-filter; the two constants come from ``benchmarks/bench_filters.py``
(filtered vs unfiltered search at several selectivities on 100k items): see
``benchmarks/results/filters.md`` and docs/filters.md.

:func:`filtered_topk` is the core over one :class:`~galleria.store.views.SpaceView`
and a sorted key set (pure apart from the two callables it is given);
:func:`search_filtered` runs it on a gallery.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from galleria.errors import InputError
from galleria.index.exact import inner_product_topk
from galleria.store import items, payloads
from galleria.store.source import SegmentSource, space_source
from galleria.store.views import SpaceView
from galleria.types import MISSING_KEY, SearchResult, clamp_k

if TYPE_CHECKING:
    from galleria.store.gallery import Gallery

PREFILTER_MIN = 2_000
"""At most this many matching items: always scan them (pre-filter)."""
PREFILTER_FRACTION = 0.02
"""... or at most this fraction of the space (measured crossover, bench_filters.py)."""
OVERFETCH_SLACK = 16
MAX_ROUNDS = 3
STRATEGIES = ("auto", "pre", "post")


@dataclass(frozen=True)
class FilterPlan:
    """How a filtered search was answered.

    Attributes:
        strategy: ``pre`` (scan of the matching items), ``post`` (index search with
            over-fetch) or ``empty`` (nothing matches).
        matching: items satisfying the filter (that hold data in the space, for
            ``pre``; an upper bound for ``post``).
        total: items in the space.
        fetched: results asked of the index in the last post-filter round, or items
            scanned by the pre-filter.
        rounds: post-filter rounds (0 for a pre-filter).
        reason: why this strategy.
    """

    strategy: str
    matching: int
    total: int
    fetched: int
    rounds: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def overfetch(k: int, matching: int, total: int) -> int:
    """Results a post-filter asks the index for, first round: enough that ``k`` of them
    match with high probability when matching items are spread like the others
    (``k + 3 sqrt(k) + 3`` expected matches: a binomial margin of about 3 sigma)."""
    frac = max(matching, 1) / max(total, 1)
    return min(total, math.ceil((k + 3 * math.sqrt(k) + 3) / frac) + OVERFETCH_SLACK)


def choose_strategy(matching: int, total: int, k: int) -> tuple[str, str]:
    """``(strategy, reason)`` for a filter matching ``matching`` of ``total`` items."""
    if matching == 0:
        return "empty", "no item matches the filter"
    limit = max(PREFILTER_MIN, PREFILTER_FRACTION * total)
    if matching <= limit:
        return "pre", (f"{matching} matching items <= max({PREFILTER_MIN}, "
                       f"{PREFILTER_FRACTION:g} x {total}): scan them")
    if overfetch(k, matching, total) >= total:
        return "pre", "the over-fetch would cover the whole space: scan the matching items"
    return "post", (f"{matching} of {total} items match: search the index with over-fetch "
                    f"(k' = {overfetch(k, matching, total)}) and keep the matching ones")


def filtered_topk(view: SpaceView, queries: np.ndarray, k: int, allowed: np.ndarray,
                  vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *,
                  strategy: str = "auto") -> tuple[SearchResult, FilterPlan]:
    """Top-``k`` items of ``view`` among the keys ``allowed``, with int64 keys.

    Args:
        view: the space's view (its index answers the post-filter).
        queries: ``(Q, D)`` float32 unit rows.
        k: results per query (``-1`` / ``-inf`` padded when fewer match).
        allowed: sorted unique int64 keys satisfying the filter (any space).
        vectors_of: ``keys -> (keys holding data in the space, sorted; (n, D) their
            vectors)``: the pre-filter's data.
        strategy: ``auto`` (:func:`choose_strategy`), ``pre`` or ``post``.

    Returns:
        ``((Q, k) SearchResult of int64 keys, FilterPlan)``.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    nq = queries.shape[0]
    total = view.count
    m = int(allowed.size)
    how, why = choose_strategy(m, total, k)
    if strategy != "auto" and how != "empty":
        how, why = strategy, "asked"
    if how == "empty" or total == 0:
        return SearchResult.empty(nq, k), FilterPlan("empty", 0, total, 0, 0, why)
    if how == "post":
        return _post_filter(view, queries, k, allowed, vectors_of, why)
    return _pre_filter(queries, k, allowed, vectors_of, total, why)


def _post_filter(view: SpaceView, queries: np.ndarray, k: int, allowed: np.ndarray,
                 vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                 why: str) -> tuple[SearchResult, FilterPlan]:
    """Over-fetch, keep the matching; rows with fewer than ``k`` matches search again
    with 4x the results (only those rows), then fall back to the scan."""
    total, m = view.count, int(allowed.size)
    kp = overfetch(k, m, total)
    res = view.search(queries, kp)
    ok = (res.ids != MISSING_KEY) & np.isin(res.ids, allowed)
    out = _first_k(res, ok, k)
    scores, ids = out.scores.copy(), out.ids.copy()
    short = np.flatnonzero(ok.sum(axis=1) < k) if kp < total else np.zeros(0, np.int64)
    rounds = 1
    while short.size and rounds < MAX_ROUNDS:
        rounds += 1
        kp = min(total, kp * 4)
        sub = view.search(queries[short], kp)
        okk = (sub.ids != MISSING_KEY) & np.isin(sub.ids, allowed)
        part = _first_k(sub, okk, k)
        scores[short], ids[short] = part.scores, part.ids
        short = short[okk.sum(axis=1) < k] if kp < total else np.zeros(0, np.int64)
    if short.size:  # matches cluster away from these queries: scan the matching items
        part, _ = _pre_filter(queries[short], k, allowed, vectors_of, total, why)
        scores[short], ids[short] = part.scores, part.ids
        why = f"{why}; {short.size} queries scanned after {MAX_ROUNDS} rounds"
    return SearchResult(scores, ids), FilterPlan("post", m, total, kp, rounds, why)


def _pre_filter(queries: np.ndarray, k: int, allowed: np.ndarray,
                vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                total: int, why: str) -> tuple[SearchResult, FilterPlan]:
    nq = queries.shape[0]
    keys, vecs = vectors_of(allowed)
    if keys.size == 0:
        return SearchResult.empty(nq, k), FilterPlan("empty", 0, total, 0, 0, why)
    scores, rows = inner_product_topk(np.ascontiguousarray(queries, np.float32),
                                      np.ascontiguousarray(vecs, np.float32), k)
    return SearchResult(scores, keys[rows]).pad(k), FilterPlan(
        "pre", int(keys.size), total, int(keys.size), 0, why)


def _first_k(res: SearchResult, ok: np.ndarray, k: int) -> SearchResult:
    """Per row, the first ``k`` entries where ``ok`` (in rank order), padded."""
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    keep = np.take_along_axis(ok, order, 1)
    s = np.where(keep, np.take_along_axis(res.scores, order, 1), -np.inf).astype(np.float32)
    i = np.where(keep, np.take_along_axis(res.ids, order, 1), MISSING_KEY)
    return SearchResult(s, i).pad(k)


class SourceCache:
    """The store's vectors of a space as a :class:`~galleria.store.source.SegmentSource`
    (key -> segment row, segment files memory-mapped), kept per space generation: the
    pre-filter's data without a database read per search."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, SegmentSource]] = {}

    def get(self, g: Gallery, space: str, dim: int) -> tuple[int, SegmentSource]:
        """``(generation, source)`` of ``space`` at its latest commit."""
        with g.db.read() as c:
            row = c.execute("SELECT generation FROM spaces WHERE space=?", (space,)).fetchone()
            if row is None:
                raise InputError(f"gallery {g.path} has no space {space!r}")
            gen = int(row[0])
            with self._lock:
                cur = self._entries.get(space)
            if cur is not None and cur[0] == gen:
                return cur
            src = space_source(c, g.path, space, dim)
        with self._lock:
            self._entries[space] = (gen, src)
        return gen, src


def search_filtered(g: Gallery, queries: np.ndarray, k: int, *, space: str, where: Any,
                    strategy: str = "auto") -> tuple[SearchResult, FilterPlan]:
    """Top-``k`` items of ``space`` satisfying ``where``, with string ids (see the module
    docstring). ``queries``: ``(Q, D)`` float32 unit rows of the space's model."""
    f = payloads.check_where(where)
    with g.db.read() as c:
        allowed = payloads.match_keys(c, f, g.payload_cache)
    view = g.view(space)
    if view.kind != "global":
        raise InputError(f"space {space!r} holds local features: filter a global space")
    generation: dict[str, int] = {"gen": view.generation}

    def vectors_of(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gen, src = g.filter_sources.get(g, space, view.dim)
        generation["gen"] = gen
        present = np.intersect1d(keys, src.keys, assume_unique=True)
        return present, src.get(present)

    kk = clamp_k(k, view.count)
    res, plan = filtered_topk(view, queries, kk, allowed, vectors_of, strategy=strategy)
    if plan.strategy == "post":
        ids = view.ids.lookup(res.ids)
    else:
        with g.db.read() as c:
            ids = items.ids_of(c, res.ids)
    return SearchResult(res.scores, ids, generation["gen"]), plan
