"""What the service answered during a backfill, and the order it asks for.

The backfill pays first where users look when it re-embeds first the items
that recent answers returned, and their neighbours (order ``queries``, the
default). The service records each answer with one call::

    record_answers(gallery_path, result.ids)   # (Q, K) string ids, None = padding

which appends one JSON line per query to ``<job>/queries/answers.jsonl`` and
does nothing when no job is running (one ``stat``). The record is

- **bounded**: past :data:`MAX_BYTES` the file is renamed to
  ``answers.1.jsonl`` (replacing the previous one): at most twice that on disk;
- **atomic per line**: one ``write(2)`` of whole lines on an ``O_APPEND``
  descriptor, so concurrent writers (threads, processes) never interleave;
- **crash-safe**: a line torn by a crash is skipped by the reader; losing the
  last lines only makes the order a little less informed.

It never raises into the service: a failure to record is logged and ignored.

:func:`query_priorities` turns the record into a weight per item (recent and
high-ranked answers weigh more); :func:`add_neighbours` spreads part of each
weight to the item's nearest neighbours in its space; :func:`front_load`
puts the answered items first, their neighbours next and the rest in the job's
seeded random order.
All three are pure or read-only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galleria.store.gallery import Gallery
from galleria.upgrade.state import job_folder

log = logging.getLogger(__name__)

LOG_DIR = "queries"
LOG_NAME = "answers.jsonl"
ROTATED_NAME = "answers.1.jsonl"
MAX_BYTES = 2 * 1024 * 1024
"""Rotate the record past this size (about 10k answers of 10 ids)."""
HALF_LIFE_S = 3600.0
"""An answer's weight halves every hour: the order follows what users look at now."""
TOP = 10
"""Ranks of an answer that count (the first page)."""


def _folder(gallery: Gallery | str | os.PathLike[str]) -> Path:
    return job_folder(gallery.path if isinstance(gallery, Gallery) else Path(gallery)) / LOG_DIR


def record_answers(gallery: Gallery | str | os.PathLike[str], ids: Any, *,
                   now: float | None = None, max_bytes: int = MAX_BYTES) -> bool:
    """Append the answers to the job's record (the service's hook; see the module docstring).

    Args:
        gallery: the gallery (or its folder) that answered.
        ids: ``(Q, K)`` string ids of the answers (``None`` = padding).
        now: the time stamp (default ``time.time()``).

    Returns:
        True when recorded (a job is running), False otherwise. Never raises.
    """
    try:
        job = _folder(gallery).parent
        if not job.is_dir():
            return False
        rows = [[str(i) for i in row[:TOP] if i is not None] for row in ids]
        if not rows:
            return False
        t = round(time.time() if now is None else float(now), 3)
        data = "".join(json.dumps({"t": t, "ids": r}, separators=(",", ":")) + "\n"
                       for r in rows if r).encode()
        if not data:
            return False
        folder = _folder(gallery)
        folder.mkdir(exist_ok=True)
        path = folder / LOG_NAME
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > max_bytes:
            _rotate(folder, max_bytes)
        return True
    except (OSError, TypeError, ValueError) as exc:  # a hint, never a failed search
        log.debug("could not record answers: %s", exc)
        return False


def _rotate(folder: Path, max_bytes: int) -> None:
    with open(folder / "rotate.lock", "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another writer is rotating
        path = folder / LOG_NAME
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > max_bytes:  # still: not rotated meanwhile
                os.replace(path, folder / ROTATED_NAME)


def read_answers(gallery: Gallery | str | os.PathLike[str]) -> list[tuple[float, list[str]]]:
    """``[(time, ids)]`` of the recorded answers, oldest first; torn lines skipped."""
    folder = _folder(gallery)
    out: list[tuple[float, list[str]]] = []
    for name in (ROTATED_NAME, LOG_NAME):
        try:
            raw = (folder / name).read_bytes()
        except FileNotFoundError:
            continue
        for line in raw.splitlines():
            # a line torn by a crash has the next record glued to it: split them again
            for piece in ([line] if line.count(b'{"t":') <= 1 else
                          [b'{"t":' + p for p in line.split(b'{"t":') if p]):
                try:
                    rec = json.loads(piece)
                    out.append((float(rec["t"]), [str(i) for i in rec["ids"]]))
                except (ValueError, KeyError, TypeError):
                    continue  # the torn part itself
    return out


def query_priorities(records: Iterable[tuple[float, Sequence[str]]], *, now: float,
                     half_life_s: float = HALF_LIFE_S) -> dict[str, float]:
    """Weight per item: sum over answers of ``0.5 ** (age / half_life) / (1 + rank)``."""
    prio: dict[str, float] = {}
    for t, ids in records:
        decay = 0.5 ** (max(0.0, now - t) / half_life_s)
        for r, i in enumerate(ids[:TOP]):
            prio[i] = prio.get(i, 0.0) + decay / (1.0 + r)
    return prio


def add_neighbours(prio: Mapping[str, float], neighbours: Mapping[str, Sequence[str]], *,
                   factor: float = 0.5) -> dict[str, float]:
    """The weight each item gets as a neighbour: ``factor * prio[i] / (1 + rank)`` summed
    over the items ``i`` it is a neighbour of.

    ``neighbours[id]`` is the item's nearest neighbours, best first (itself excluded).
    """
    out: dict[str, float] = {}
    for i, w in prio.items():
        for r, j in enumerate(neighbours.get(i, ())):
            out[j] = out.get(j, 0.0) + factor * w / (1.0 + r)
    return out


def front_load(ordered: Sequence[str], prio: Mapping[str, float],
               then: Mapping[str, float] | None = None) -> list[str]:
    """Items weighted in ``prio`` first, then those weighted in ``then`` only (each tier
    highest weight first), then the rest, ties and the rest in ``ordered``'s order.

    ``ordered`` is the job's seeded random order of the pending items, so with no
    recorded answers this *is* the random order (O(n) per call: the service's
    answers are re-read often during a run).
    """
    pos = {i: n for n, i in enumerate(ordered)}
    then = then or {}
    first = sorted((i for i in ordered if prio.get(i, 0.0) > 0.0),
                   key=lambda i: (-prio[i] - then.get(i, 0.0), pos[i]))
    second = sorted((i for i in ordered if prio.get(i, 0.0) <= 0.0 < then.get(i, 0.0)),
                    key=lambda i: (-then[i], pos[i]))
    return first + second + [i for i in ordered
                             if prio.get(i, 0.0) <= 0.0 and then.get(i, 0.0) <= 0.0]


Known = Callable[[Sequence[str]], Mapping[str, np.ndarray]]
"""``ids -> {id: vector}`` for items no longer in the space (moved by the backfill)."""


def item_neighbours(gallery: Gallery, space: str, ids: Sequence[str], *, k: int = 5,
                    known: Known | None = None) -> dict[str, list[str]]:
    """The ``k`` nearest neighbours in ``space`` of items (the items themselves excluded).

    An item's vector is its vector in ``space``, or ``known(ids)[id]`` (the old
    vector of an item the backfill has moved out of ``space``); items with
    neither are skipped. One batched search of the space's view.
    """
    if not ids or k <= 0:
        return {}
    ids = list(ids)
    inside = gallery.has(ids, space)
    have = [i for i, h in zip(ids, inside, strict=True) if h]
    rows = [gallery.get_vectors(gallery.keys_of(have), space=space)] if have else []
    out_ids = [i for i, h in zip(ids, inside, strict=True) if not h]
    got = known(out_ids) if known is not None and out_ids else {}
    extra = [i for i in out_ids if i in got]
    if extra:
        rows.append(np.stack([got[i] for i in extra]))
    which = have + extra
    if not which:
        return {}
    view = gallery.view(space)
    if not view.count:
        return {}
    vecs = np.ascontiguousarray(np.concatenate(rows), np.float32)
    res = view.search_ids(vecs, min(k + 1, view.count))
    return {i: [j for j in res.ids[n] if j is not None and j != i][:k]
            for n, i in enumerate(which)}


def query_order(gallery: Gallery, ordered: Sequence[str], *, space: str,
                now: float | None = None, hot_limit: int = 1000, k: int = 5,
                known: Known | None = None) -> tuple[list[str], dict[str, float]]:
    """The ``queries`` order of the pending items (``ordered``: their random order).

    The ``hot_limit`` highest-weighted answered items spread weight to their ``k``
    neighbours in ``space`` (the old space, where pending items live; ``known``:
    old vectors of answered items already moved). Returns the order and the weights.
    """
    now = time.time() if now is None else now
    prio = query_priorities(read_answers(gallery), now=now)
    if not prio:
        return list(ordered), {}
    hot = sorted(prio, key=lambda i: -prio[i])[:hot_limit]
    near = add_neighbours(prio, item_neighbours(gallery, space, hot, k=k, known=known))
    return front_load(ordered, prio, near), {**near, **prio}
