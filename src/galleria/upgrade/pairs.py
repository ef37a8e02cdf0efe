"""(old, new) vector pairs of backfilled items, kept for calibration and psi training."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from galleria.errors import InputError
from galleria.io.atomic import load_array, read_json, write_json, write_npy
from galleria.upgrade.state import job_folder

log = logging.getLogger(__name__)


class PairStore:
    """(old, new) vector pairs of backfilled items, kept for calibration and psi.

    Each chunk is ``<n>.old.npy``, ``<n>.new.npy`` and ``<n>.json`` (ids), the
    JSON written last (atomic writes): a chunk without its JSON is ignored.
    A chunk written just before a crash that lost its batch is harmless: the
    items are re-embedded later and :meth:`load` keeps one pair per id.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _chunks(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("*.json"))

    def count(self) -> int:
        return sum(int(read_json(p).get("n", 0)) for p in self._chunks())

    def append(self, ids: Sequence[str], old: np.ndarray, new: np.ndarray) -> None:
        if not (len(ids) == old.shape[0] == new.shape[0]):
            raise InputError("pairs need one old and one new vector per id")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}"
        write_npy(self.folder / f"{name}.old.npy", old.astype(np.float32))
        write_npy(self.folder / f"{name}.new.npy", new.astype(np.float32))
        write_json(self.folder / f"{name}.json", {"n": len(ids), "ids": list(ids)})

    def lookup(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """``{id: old vector}`` of the wanted ids that have a pair (chunks memory-mapped)."""
        want = set(ids)
        out: dict[str, np.ndarray] = {}
        for p in self._chunks():
            if not want:
                break
            try:
                meta = read_json(p)
                rows = [(j, i) for j, i in enumerate(meta["ids"]) if i in want]
                if not rows:
                    continue
                arr = load_array(self.folder / f"{p.name[: -len('.json')]}.old.npy",
                              mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, KeyError):
                continue
            for j, i in rows:
                out[i] = np.array(arr[j], dtype=np.float32)
                want.discard(i)
        return out

    def load(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(ids, old (N, D_old), new (N, D_new))`` with one pair per id."""
        ids: list[str] = []
        olds: list[np.ndarray] = []
        news: list[np.ndarray] = []
        seen: set[str] = set()
        for p in self._chunks():
            stem = p.name[: -len(".json")]
            try:
                meta = read_json(p)
                o = load_array(self.folder / f"{stem}.old.npy", allow_pickle=False)
                n = load_array(self.folder / f"{stem}.new.npy", allow_pickle=False)
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable pair chunk %s: %s", p, exc)
                continue
            keep = [j for j, i in enumerate(meta["ids"]) if i not in seen]
            seen.update(meta["ids"])
            ids += [meta["ids"][j] for j in keep]
            olds.append(o[keep])
            news.append(n[keep])
        if not ids:
            return [], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return ids, np.concatenate(olds), np.concatenate(news)


def load_pairs(gallery_path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The (old, new) pairs the job has collected so far (see :class:`PairStore`)."""
    return PairStore(job_folder(gallery_path) / "pairs").load()


def load_pseudo_pairs(gallery_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(old (P, D_old), new (P, D_new))`` query embeddings of the job's pseudo-queries.

    Written once per job by :func:`galleria.upgrade.online.job_pseudo_queries`
    (arrays first, the header naming them last); ``None`` until then. They are
    images embedded in both spaces, so they join the calibration cohort from the
    first query on (before any item has moved).
    """
    folder = job_folder(gallery_path) / "online" / "pseudo"
    try:
        meta = read_json(folder / "pseudo.json")
        old = load_array(folder / "old.npy", allow_pickle=False)
        new = load_array(folder / "new.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not meta.get("cohort", True) or len(old) != len(new) or len(old) != len(meta.get("ids", [])):
        return None
    return old, new


def cohort_pairs(gallery_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(old (C, D_old), new (C, D_new))``: the calibration cohort of a job at this
    moment: its pseudo-query embeddings first (when recorded), then the job's pairs
    in the order they were collected (so a cohort of ``n`` is always the first ``n``
    rows of any later cohort: answers can be recomputed, ``service.audit``)."""
    ids, old, new = load_pairs(gallery_path)
    extra = load_pseudo_pairs(gallery_path)
    if extra is None or (ids and extra[0].shape[1] != old.shape[1]):
        return old, new
    if not ids:
        return extra
    return np.concatenate([extra[0], old]), np.concatenate([extra[1], new])
