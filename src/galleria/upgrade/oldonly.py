"""The old model's own answers during an online backfill (rules ``old-only`` and ``both``).

An online backfill moves each item out of the old space, but the job keeps the
(old, new) vector pairs of the items it moves (:class:`~galleria.upgrade.pairs.PairStore`:
the calibration cohort and the online-psi training pairs, up to
``OnlineConfig.max_pairs``). With those, search can still answer exactly as the
old model alone would on the whole gallery: the old part of the gallery plus
the kept old vectors of the moved items, scored with ``old(q)`` in one space (no
merge scale needed). The pseudo-query check (:mod:`galleria.upgrade.online`)
uses this as the guard: search serves the old answers until a merge rule beats
them on the gallery's own pseudo-queries. Rule ``both`` scores every moved item
with both models (the mean of the two Z-normed scores: an ensemble of the two
models where both vectors are known), the others with the old model.

Only possible while the pairs cover every moved item (:meth:`MovedOldVectors.covers`);
a job that moved more items than it keeps pairs for cannot serve old-only.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from galleria.io.atomic import load_array, read_json
from galleria.types import SearchResult
from galleria.upgrade.pairs import PairStore
from galleria.upgrade.state import job_folder


class MovedOldVectors:
    """(old, new) vectors of the moved items, read from the job's pairs as they grow.

    Args:
        gallery_path: the gallery under upgrade.
    """

    def __init__(self, gallery_path: str | os.PathLike[str]) -> None:
        folder = job_folder(gallery_path)
        self.stores = [PairStore(folder / "pairs"), PairStore(folder / "online" / "pairs")]
        self._seen_chunks: set[str] = set()
        self._seen_ids: set[str] = set()
        self._lock = threading.Lock()  # the service searches from several threads
        # (ids (N,), old (N, D_old), new (N, D_new)): replaced as one, never mutated
        self.snapshot: tuple[np.ndarray, np.ndarray, np.ndarray] = (
            np.empty(0, dtype=object), np.zeros((0, 0), np.float32),
            np.zeros((0, 0), np.float32))

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read the pair chunks written since the last call (chunks are append-only:
        each is read once; an id already read keeps its first pair); returns the
        current ``(ids, old, new)``."""
        with self._lock:
            fresh = [p for st in self.stores for p in st._chunks()
                     if str(p) not in self._seen_chunks]
            cur_ids, cur_old, cur_new = self.snapshot
            ids: list[str] = []
            olds: list[np.ndarray] = [cur_old] if len(cur_ids) else []
            news: list[np.ndarray] = [cur_new] if len(cur_ids) else []
            for p in fresh:
                stem = p.name[: -len(".json")]
                try:
                    meta = read_json(p)
                    o = load_array(p.parent / f"{stem}.old.npy", allow_pickle=False)
                    n = load_array(p.parent / f"{stem}.new.npy", allow_pickle=False)
                except (OSError, ValueError):
                    continue  # a chunk being written: read at the next call
                self._seen_chunks.add(str(p))
                keep = [j for j, i in enumerate(meta["ids"]) if i not in self._seen_ids]
                self._seen_ids.update(meta["ids"])
                ids += [meta["ids"][j] for j in keep]
                olds.append(o[keep])
                news.append(n[keep])
            if ids:
                self.snapshot = (np.concatenate([cur_ids, np.asarray(ids, dtype=object)]),
                                 np.concatenate(olds).astype(np.float32, copy=False),
                                 np.concatenate(news).astype(np.float32, copy=False))
            return self.snapshot

    def moved_rows(self, new_view: Any
                   ) -> tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(rows of the kept vectors that are moved items now, moved items, (ids, old,
        new))``: rows index that one consistent snapshot."""
        snap = self.load()
        if new_view is None or not new_view.count:
            return np.zeros(0, np.int64), 0, snap
        moved = new_view.ids.lookup(new_view.keys())
        rows = np.flatnonzero(np.isin(snap[0], moved)) if len(snap[0]) else \
            np.zeros(0, np.int64)
        return rows, len(moved), snap

    def covers(self, new_view: Any) -> bool:
        """Whether every moved item has its old vector kept."""
        rows, moved, _ = self.moved_rows(new_view)
        return len(rows) >= moved

    def search(self, q: np.ndarray, k: int, new_view: Any) -> SearchResult | None:
        """Top-``k`` string ids among the moved items, scored by their old vectors
        (``None`` when some moved item has no kept old vector)."""
        rows, moved, (ids, old, _) = self.moved_rows(new_view)
        if len(rows) < moved:
            return None
        return top_ids(q @ old[rows].T if len(rows) else None, ids[rows], len(q), k)

    def search_both(self, qo: np.ndarray, qn: np.ndarray, k: int, new_view: Any,
                    norm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
                    ) -> SearchResult | None:
        """Top-``k`` moved items by ``0.5 (z_old + z_new)``; ``norm`` = per-query
        ``(mean_old, std_old, mean_new, std_new)``, each ``(Q, 1)`` (``None``: some moved
        item has no kept vectors)."""
        rows, moved, (ids, old, new) = self.moved_rows(new_view)
        if len(rows) < moved:
            return None
        if not len(rows):
            return top_ids(None, ids[rows], len(qo), k)
        mo, so, mn, sn = norm
        z = 0.5 * ((qo @ old[rows].T - mo) / so + (qn @ new[rows].T - mn) / sn)
        return top_ids(z, ids[rows], len(qo), k)


def top_ids(s: np.ndarray | None, ids: np.ndarray, nq: int, k: int) -> SearchResult:
    """Top-``k`` of a ``(Q, N)`` score matrix as string ids (padded; ``None``: empty)."""
    out = SearchResult.empty(nq, k, object_ids=True)
    if s is None or not s.shape[1]:
        return out
    kk = min(k, s.shape[1])
    top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    out.scores[:, :kk] = np.take_along_axis(s, top, 1)
    out.ids[:, :kk] = ids[top]
    return out
