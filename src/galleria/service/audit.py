"""Check a service's answers against brute force over the committed state of their generation.

A response names the committed generation it was computed at (per space during
an upgrade). :class:`StoreRecorder` watches a gallery from the side, as a
reader in another thread or process: it polls the change log (every key that
entered or left each space, at which generation), the key -> id map, and the
vector of each (space, key) while it is committed. From that it rebuilds the
exact membership of any space at any generation it has seen, and
:func:`check_response` recomputes the answer by brute force (all member
vectors, float64 dot products; during an upgrade both parts, the job's merge
rule and calibration) and compares ranked ids and scores (ties within a
tolerance may swap).

Limits: a vector that was replaced or removed between two polls is unknown
(answers at generations that need it count as *unverifiable*, never as
correct); the log must not be pruned past the recorder's start (the store
keeps 50 000 rows); calibrations other than identity / Z-norm are not
recomputed.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.store.gallery import Gallery
from galleria.store.items import Snapshot
from galleria.types import SearchResult


class Unverifiable(Exception):
    """The recorder lacks something needed to recompute this answer."""


class StoreRecorder:
    """Everything committed to a gallery, polled by a reader (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.g = Gallery.open(self.path, readonly=True)
        self.ops: dict[str, list[tuple[int, str, int]]] = defaultdict(list)  # (gen, op, key)
        self.ids: dict[int, str] = {}
        self.vectors: dict[tuple[str, int, int], np.ndarray] = {}  # (space, key, add gen)
        self.baseline: dict[str, set[int]] = defaultdict(set)
        self.baseline_gen: dict[str, int] = {}
        self.last_gen = 0
        self.max_key = 0
        self.polls = 0
        self.missed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pairs: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self._members: dict[tuple[str, int], dict[int, int]] = {}
        self._states: dict[tuple[str, int], tuple[list[str], np.ndarray]] = {}
        self._start()

    def _start(self) -> None:
        with self._lock, self.g.snapshot() as s:
            for space, (floor, gen) in s.log_floors().items():
                if floor > 0:  # pruned log: the present keys are the baseline
                    keys = [int(k) for k in s.space_keys(space)]
                    self.baseline[space] = set(keys)
                    self.baseline_gen[space] = gen
                    self._fetch(s, space, {k: -1 for k in keys})
            self._poll(s)

    # ------------------------------------------------------------- polling
    def poll(self) -> None:
        with self._lock, self.g.snapshot() as s:
            self._poll(s)

    def _poll(self, s: Snapshot) -> None:
        changes = s.changes_since(self.last_gen)
        for k, i in s.id_table(self.max_key).items():
            self.ids[k] = i
            self.max_key = max(self.max_key, k)
        latest: dict[str, dict[int, int]] = defaultdict(dict)
        for ch in changes:
            self.ops[ch.space].append((ch.generation, ch.op, ch.key))
            if ch.op == "add":
                latest[ch.space][ch.key] = ch.generation
            else:
                latest[ch.space].pop(ch.key, None)
            self.last_gen = max(self.last_gen, ch.generation)
        for space, added in latest.items():
            if added:
                self._fetch(s, space, added)
        self.polls += 1

    def _fetch(self, s: Snapshot, space: str, added: dict[int, int]) -> None:
        """Vectors of keys whose latest add is ``added[key]``, if still committed."""
        keys = sorted(s.present(space, list(added)))
        self.missed += len(added) - len(keys)
        if not keys:
            return
        vecs = s.vectors(space, np.array(keys, np.int64))
        if vecs is None:  # a local space (not recomputed) or one dropped meanwhile
            return
        for k, v in zip(keys, vecs, strict=True):
            self.vectors[(space, k, added[k])] = np.array(v, np.float32)

    def start(self, interval_s: float = 0.1) -> StoreRecorder:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll()
                except Exception:
                    continue

        self._thread = threading.Thread(target=loop, name="store-recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.g.close()

    def keep_pairs(self) -> None:
        """Read the upgrade job's calibration cohort (call before ``finish`` deletes it)."""
        from galleria.upgrade.pairs import cohort_pairs  # lazy: PIL

        old, new = cohort_pairs(self.path)
        self.pairs = ([], old, new)

    # --------------------------------------------------------- membership
    def members(self, space: str, gen: int) -> dict[int, int]:
        """``key -> add generation`` of the keys in ``space`` at generation ``gen``."""
        with self._lock:
            hit = self._members.get((space, gen))
            if hit is not None:
                return hit
            ops = list(self.ops.get(space, ()))
            base = set(self.baseline.get(space, set()))
            final = gen <= self.last_gen  # nothing later polled can change it
        if space in self.baseline_gen and gen < self.baseline_gen[space]:
            raise Unverifiable(f"generation {gen} of {space} predates the recorder")
        state: dict[int, int] = {k: -1 for k in base}
        for g, op, key in ops:
            if g > gen:
                break
            if op == "add":
                state[key] = g
            else:
                state.pop(key, None)
        if final:
            with self._lock:
                self._members[(space, gen)] = state
        return state

    def state(self, space: str, gen: int) -> tuple[list[str], np.ndarray]:
        """``(ids, vectors (N, D))`` of ``space`` at ``gen`` (Unverifiable: a vector unseen)."""
        hit = self._states.get((space, gen))
        if hit is not None:
            return hit
        mem = self.members(space, gen)
        ids, vecs = [], []
        for key, added in sorted(mem.items()):
            v = self.vectors.get((space, key, added))
            if v is None:
                raise Unverifiable(f"the vector of key {key} in {space} (added at generation "
                                   f"{added}) was not seen")
            ids.append(self.ids.get(key, f"<key {key}>"))
            vecs.append(v)
        out = (ids, np.stack(vecs)) if vecs else ([], np.zeros((0, 0), np.float32))
        if (space, gen) in self._members:  # final: keep the last few states
            if len(self._states) >= 8:
                self._states.pop(next(iter(self._states)))
            self._states[(space, gen)] = out
        return out

    def member_ids(self, space: str, gen: int) -> set[str]:
        return {self.ids.get(k, f"<key {k}>") for k in self.members(space, gen)}


# ------------------------------------------------------------- brute force
def _top(q: np.ndarray, ids: list[str], vecs: np.ndarray, k: int) -> SearchResult:
    """Exact top-k of one query over ``vecs`` (float64), padded with None / -inf."""
    out = SearchResult.empty(1, k, object_ids=True)
    if not ids:
        return out
    s = vecs.astype(np.float64) @ q.astype(np.float64)
    order = np.argsort(-s, kind="stable")[:k]
    out.scores[0, : len(order)] = s[order]
    out.ids[0, : len(order)] = np.asarray(ids, dtype=object)[order]
    return out


def brute_force(rec: StoreRecorder, resp: dict[str, Any], *, k: int) -> SearchResult:
    """Recompute a response (top ``k`` before its offset) from the recorded state."""
    gen = resp["generation"]
    query = resp.get("query")
    if not query:
        raise Unverifiable("the response carries no query vectors (ask with return_query)")
    merge = resp.get("merge")
    if merge is None:
        space = resp["model"]
        ids, vecs = rec.state(space, int(gen))
        return _top(np.asarray(query[space], np.float32), ids, vecs, k)
    from galleria.upgrade.merge import CohortNorm, merge_results  # lazy: PIL

    old, new = merge["old_space"], merge["new_space"]
    if merge["rule"] not in ("rank-merge", "naive"):
        raise Unverifiable(f"rule {merge['rule']!r} is not recomputed")
    qo, qn = (np.asarray(query[s], np.float32) for s in (old, new))
    parts = []
    for space, q in ((old, qo), (new, qn)):
        if isinstance(gen, dict) and space in gen:
            ids, vecs = rec.state(space, int(gen[space]))
            parts.append(_top(q, ids, vecs, k))
        else:
            parts.append(SearchResult.empty(1, k, object_ids=True))
    cal = merge.get("calibration") or {}
    kind = str(cal.get("kind", "identity"))
    if kind.startswith("znorm"):
        if rec.pairs is None:
            raise Unverifiable("call recorder.keep_pairs() before the upgrade finishes")
        n = int(cal["cohort"])
        _, po, pn = rec.pairs
        if len(po) < n:
            raise Unverifiable(f"the recorder holds {len(po)} pairs, the answer used {n}")
        top = None if kind == "znorm" else int(kind[len("znorm-top"):])
        norm = CohortNorm(po[:n], pn[:n], top=top)
        parts = list(norm.apply(parts[0], parts[1], qo[None], qn[None]))
    elif kind != "identity":
        raise Unverifiable(f"calibration {kind!r} is not recomputed")
    return merge_results(parts, k, maps=[None, None])


@dataclass
class Verdict:
    ok: bool
    problem: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def check_members(rec: StoreRecorder, resp: dict[str, Any]) -> Verdict:
    """Every result names an item committed at the response's generation, once."""
    ids = [r["id"] for r in resp["results"]]
    if len(set(ids)) != len(ids):
        return Verdict(False, "duplicate", {"ids": ids})
    gen = resp["generation"]
    try:
        if resp.get("merge") is None:
            allowed = rec.member_ids(resp["model"], int(gen))
        else:
            allowed = set()
            for sp, g in gen.items():
                allowed |= rec.member_ids(sp, int(g))
    except Unverifiable as exc:
        return Verdict(True, f"unverifiable: {exc}")
    bad = [i for i in ids if i not in allowed]
    if bad:
        return Verdict(False, "missing", {"ids": bad, "generation": gen})
    return Verdict(True)


def check_response(rec: StoreRecorder, resp: dict[str, Any], *, tol: float | None = None
                   ) -> Verdict:
    """Compare a response with brute force at its generation (see the module docstring)."""
    v = check_members(rec, resp)
    if not v.ok:
        return v
    k, offset = int(resp["k"]), int(resp["offset"])
    margin = 20
    try:
        bf = brute_force(rec, resp, k=k + offset + margin)
    except Unverifiable as exc:
        return Verdict(True, f"unverifiable: {exc}")
    tol = tol if tol is not None else (1e-3 if resp.get("merge") else 1e-4)
    got = [(r["id"], float(r["score"])) for r in resp["results"]]
    want = [(i, float(s)) for i, s in zip(bf.ids[0], bf.scores[0], strict=True)
            if i is not None]
    window = want[offset : offset + k]
    if len(got) != len(window):
        return Verdict(False, "length", {"got": len(got), "want": len(window)})
    for n, ((gi, gs), (wi, ws)) in enumerate(zip(got, window, strict=True)):
        if abs(gs - ws) > tol * max(1.0, abs(ws)):
            return Verdict(False, "score", {"rank": n + offset, "got": (gi, gs),
                                             "want": (wi, ws)})
        if gi != wi:  # a tie may swap: the id must score the same in brute force
            tied = {i for i, s in want if abs(s - gs) <= tol * max(1.0, abs(gs))}
            if gi not in tied:
                return Verdict(False, "rank", {"rank": n + offset, "got": (gi, gs),
                                                "want": (wi, ws)})
    return Verdict(True)
