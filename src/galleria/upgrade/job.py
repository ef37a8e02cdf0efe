"""The backfill job: move a live gallery from an old model's space to a new one's.

Lifecycle (one function per step, each resumable)::

    start_upgrade(G, "effnet-lite2")   register the new space, record the job
    run_upgrade(G, limit=...)          re-embed items in batches (repeat until done)
    upgrade_status(G)                  fraction done, rate, ETA, failures, consistency
    finish_upgrade(G)                  at 100 %: drop the old space, new one is primary

State lives in the gallery: the setting ``"upgrade"`` (old/new space, the new
model's recipe, mode, order seed, attached transforms), ``"upgrade:progress"``
(rate bookkeeping) and the folder ``<gallery>/upgrade/`` (calibration pairs,
trained transforms). Nothing of it survives :func:`finish_upgrade`.

Exactly-once under ``kill -9``: each committed batch is a single
``gallery.add(ids, new_vectors, space=new, drop_spaces=[old])`` -- one SQLite
transaction that writes the new vectors and deletes the old ones, so an item is
never in both spaces and never in neither. What a run has to do is derived from
the store (items with an old vector and no new vector), not from a counter, so a
killed run loses at most the uncommitted batch and the next run picks up
exactly the rest. Saved indexes are a cache: the change log brings them up to
date on load, so correctness never depends on them. A lock file keeps two
runs of the same gallery from racing (the lock dies with its process).

Modes: ``online`` (the default; items move, search merges both parts) and
``shadow`` (the "old-only until done, then switch" baseline: new vectors are
added beside the old ones, search stays on the old model, ``finish`` drops the
old vectors; twice the storage during the backfill).

Items whose image cannot be re-embedded (file gone, unreadable, no stored path)
stay in the old space (still searchable), are recorded as failures of the new
space and listed by :func:`upgrade_status`; later runs skip them unless
``retry_failed``; :func:`finish_upgrade` refuses while any remain unless
``force=True``, which removes them from the gallery (as a fresh index of the new
model would not contain them either).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, GalleriaError, InputError
from galleria.extract.embed import Progress, embed_stream
from galleria.extract.job import extractor_from_space, recipe
from galleria.extractors.base import Extractor
from galleria.extractors.registry import create_extractor
from galleria.images.sources import SourceItem
from galleria.io.atomic import read_json, write_json, write_npy
from galleria.store.gallery import Failure, Gallery

log = logging.getLogger(__name__)

STATE_KEY = "upgrade"
PROGRESS_KEY = "upgrade:progress"
FOLDER = "upgrade"
ORDERS = ("random", "id", "priority")
MODES = ("online", "shadow")
JOB_VERSION = 1


class UpgradeError(GalleriaError):
    """The upgrade cannot proceed as asked (no job, already the model, not at 100 %...)."""


# --------------------------------------------------------------------------- #
# State
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class UpgradeState:
    """The job recorded in the gallery by :func:`start_upgrade`."""

    old_space: str
    new_space: str
    new_model: str
    mode: str = "online"
    order: str = "random"
    seed: int = 0
    calib_size: int = 1000
    started: float = 0.0
    transforms: dict[str, str] = field(default_factory=dict)
    version: int = JOB_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpgradeState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def active_upgrade(gallery: Gallery) -> UpgradeState | None:
    """The upgrade in progress on ``gallery``, or ``None``."""
    d = gallery.get_setting(STATE_KEY)
    return UpgradeState.from_dict(d) if d else None


def require_upgrade(gallery: Gallery) -> UpgradeState:
    state = active_upgrade(gallery)
    if state is None:
        raise UpgradeError(
            f"no upgrade in progress on {gallery.path}; start one with "
            "`galleria upgrade start INDEX --new-model M`"
        )
    return state


def job_folder(gallery: Gallery | str | os.PathLike[str]) -> Path:
    base = gallery.path if isinstance(gallery, Gallery) else Path(gallery)
    return Path(base) / FOLDER


def _save_state(gallery: Gallery, state: UpgradeState) -> None:
    gallery.set_setting(STATE_KEY, state.to_dict())


def attach_transform(gallery: Gallery, name: str, path: str | os.PathLike[str]) -> UpgradeState:
    """Record a trained map (psi / BCT head) under ``name`` in the job (checks its models)."""
    from galleria.upgrade.psi import load_cross_map

    state = require_upgrade(gallery)
    load_cross_map(path, old_fingerprint=state.old_space, new_fingerprint=state.new_space)
    p = Path(path).resolve()
    try:
        stored = p.relative_to(Path(gallery.path).resolve()).as_posix()
    except ValueError:
        stored = str(p)
    new = UpgradeState.from_dict({**state.to_dict(), "transforms": {**state.transforms,
                                                                    name: stored}})
    _save_state(gallery, new)
    return new


def transform_path(gallery: Gallery, state: UpgradeState, name: str) -> Path | None:
    rel = state.transforms.get(name)
    if rel is None:
        return None
    p = Path(rel)
    return p if p.is_absolute() else Path(gallery.path) / p


# --------------------------------------------------------------------------- #
# start
# --------------------------------------------------------------------------- #


def start_upgrade(
    gallery_path: str | os.PathLike[str],
    new_model: str,
    *,
    extractor: Extractor | None = None,
    pooling: str | None = None,
    scales: Sequence[float] = (1.0,),
    checkpoint: str | None = None,
    size: int | None = None,
    resize: str | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    mode: str = "online",
    order: str = "random",
    seed: int = 0,
    calib_size: int = 1000,
) -> UpgradeState:
    """Create the job: register the new model's space (with its recipe) and record it.

    Args:
        gallery_path: an existing gallery; its primary space is the old model.
        new_model: registry name of the new model (``effnet-lite2``...), built
            with the options ``pooling``... as ``galleria index`` would.
        mode: ``online`` (move items, merged search) or ``shadow`` (old-only
            search until finish).
        order: default order of :func:`run_upgrade` (``random`` with ``seed``,
            ``id`` = insertion order, ``priority`` = item meta ``priority``,
            highest first).
        calib_size: how many (old, new) vector pairs the run keeps for score
            calibration and psi training (0 = none).

    Raises:
        UpgradeError: an upgrade is already in progress, or the gallery already
            uses ``new_model`` (same fingerprint).
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}")
    if calib_size < 0:
        raise InputError(f"calib_size must be >= 0, got {calib_size}")
    with Gallery.open(gallery_path) as gallery:
        current = active_upgrade(gallery)
        if current is not None:
            raise UpgradeError(
                f"an upgrade to {current.new_space!r} is already in progress on {gallery.path}; "
                "finish it first (`galleria upgrade status` shows how far it is)"
            )
        old = gallery.primary_space
        if old is None:
            raise UpgradeError(f"gallery {gallery.path} is empty: nothing to upgrade")
        old_info = gallery.space_info(old)
        options: dict[str, Any] = {"pooling": pooling, "scales": list(scales),
                                   "checkpoint": checkpoint, "size": size, "resize": resize}
        if extractor is None:
            extra = {k: v for k, v in (("size", size), ("resize", resize)) if v is not None}
            extractor = create_extractor(
                new_model, pooling=pooling, scales=scales, checkpoint=checkpoint,
                runtime=runtime, threads=threads, **extra,
            )
        new = extractor.fingerprint
        if new == old:
            raise UpgradeError(
                f"gallery {gallery.path} already uses {new_model!r} (fingerprint {new!r}); "
                "an upgrade needs a different model or different settings"
            )
        if "recipe" not in old_info.info:
            log.warning("old space %s records no recipe: rank-merge needs old query vectors", old)
        gallery.register_space(new, extractor.dim, recipe(extractor, new_model, options))
        state = UpgradeState(
            old_space=old, new_space=new, new_model=new_model, mode=mode, order=order,
            seed=int(seed), calib_size=int(calib_size), started=time.time(),
        )
        _save_state(gallery, state)
        gallery.set_setting(PROGRESS_KEY, {"runs": []})
        job_folder(gallery).mkdir(parents=True, exist_ok=True)
        log.info("upgrade %s -> %s started (%s, order %s)", old, new, mode, order)
        return state


# --------------------------------------------------------------------------- #
# run
# --------------------------------------------------------------------------- #


@dataclass
class RunReport:
    """What one :func:`run_upgrade` call did."""

    gallery: str
    old_space: str
    new_space: str
    order: str
    todo_before: int
    moved: int = 0
    failed: list[Failure] = field(default_factory=list)
    remaining: int = 0
    adopted: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def items_per_s(self) -> float:
        return self.moved / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery,
            "old_space": self.old_space,
            "new_space": self.new_space,
            "order": self.order,
            "todo_before": self.todo_before,
            "moved": self.moved,
            "failed": len(self.failed),
            "failures": [f.to_dict() for f in self.failed],
            "remaining": self.remaining,
            "adopted": self.adopted,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.items_per_s, 2),
            "interrupted": self.interrupted,
        }


def order_ids(
    ids: Sequence[str],
    order: str,
    *,
    seed: int = 0,
    priorities: Sequence[float] | None = None,
) -> list[str]:
    """The backfill order of ``ids``.

    ``random``: by ``sha256(seed, id)`` -- a seeded shuffle that does not depend
    on which items are still to do, so resumed runs continue the same sequence.
    ``id``: as given (the gallery's insertion order). ``priority``: highest
    ``priorities`` first, ties in the given order.
    """
    if order == "random":
        salt = str(int(seed)).encode() + b"\0"
        return sorted(ids, key=lambda i: hashlib.sha256(salt + i.encode()).digest())
    if order == "id":
        return list(ids)
    if order == "priority":
        if priorities is None or len(priorities) != len(ids):
            raise InputError("priority order needs one priority per id")
        idx = np.argsort(-np.asarray(priorities, dtype=np.float64), kind="stable")
        return [ids[i] for i in idx]
    raise InputError(f"order must be one of {ORDERS}, got {order!r}")


def pending_ids(gallery: Gallery, state: UpgradeState) -> list[str]:
    """Items with an old vector and no new one, in key (insertion) order."""
    done = set(gallery.ids(state.new_space))
    return [i for i in gallery.ids(state.old_space) if i not in done]


@contextlib.contextmanager
def _run_lock(gallery: Gallery) -> Iterator[None]:
    folder = job_folder(gallery)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / "run.lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpgradeError(
                f"another `galleria upgrade run` is working on {gallery.path}"
            ) from None
        yield
    finally:
        fh.close()


def _priority(meta: dict[str, Any] | None) -> float:
    try:
        return float((meta or {}).get("priority", 0.0))
    except (TypeError, ValueError):
        return 0.0


def _source_item(item_id: str, meta: dict[str, Any] | None) -> SourceItem | Failure:
    m = meta or {}
    path = m.get("path")
    if not path:
        return Failure(item_id, "", "no image path stored in the item's metadata")
    bbox = m.get("bbox")
    box = tuple(float(v) for v in bbox) if isinstance(bbox, (list, tuple)) and len(bbox) == 4 \
        else None
    return SourceItem(id=item_id, path=Path(path), bbox=box)  # type: ignore[arg-type]


def run_upgrade(
    gallery_path: str | os.PathLike[str],
    *,
    limit: int | None = None,
    order: str | None = None,
    extractor: Extractor | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    commit_every: int = 256,
    retry_failed: bool = False,
    save_every_s: float = 120.0,
    progress: Progress | None = None,
) -> RunReport:
    """Re-embed pending items with the new model and move them, batch by batch.

    Args:
        limit: process at most this many pending items (then stop; run again).
        order: override the job's order (``random``, ``id``, ``priority``).
        extractor: the new model (default: rebuilt from the new space's recipe,
            fingerprint checked).
        commit_every: items per committed transaction (the most a crash loses).
        retry_failed: also retry items whose image failed before.
        save_every_s: save both spaces' indexes at most this often (a cache only).
        progress: ``update(n)`` per processed image.

    Returns:
        RunReport; ``interrupted`` is True after Ctrl-C (everything committed
        before it is kept; run again to continue).
    """
    t0 = time.perf_counter()
    if commit_every < 1:
        raise InputError(f"commit_every must be >= 1, got {commit_every}")
    gallery = Gallery.open(gallery_path)
    try:
        state = require_upgrade(gallery)
        order = order or state.order
        if order not in ORDERS:
            raise InputError(f"order must be one of {ORDERS}, got {order!r}")
        with _run_lock(gallery):
            return _run(gallery, state, order=order, limit=limit, extractor=extractor,
                        runtime=runtime, threads=threads, batch_size=batch_size,
                        workers=workers, commit_every=commit_every, retry_failed=retry_failed,
                        save_every_s=save_every_s, progress=progress, t0=t0)
    finally:
        gallery.close()


def _run(
    gallery: Gallery,
    state: UpgradeState,
    *,
    order: str,
    limit: int | None,
    extractor: Extractor | None,
    runtime: str,
    threads: int | None,
    batch_size: int,
    workers: int,
    commit_every: int,
    retry_failed: bool,
    save_every_s: float,
    progress: Progress | None,
    t0: float,
) -> RunReport:
    old, new = state.old_space, state.new_space
    if extractor is None:
        extractor = extractor_from_space(gallery.space_info(new).info, runtime=runtime,
                                         threads=threads)
    elif extractor.fingerprint != new:
        raise CompatibilityError(
            f"the extractor makes {extractor.fingerprint!r} but the upgrade is to {new!r}"
        )
    adopted = 0
    if state.mode == "online":
        # items given a new vector outside the job (e.g. `galleria index` with the new
        # model during the upgrade) keep it and lose the old one: one space per item
        both = sorted(set(gallery.ids(old)) & set(gallery.ids(new)))
        for start in range(0, len(both), 4096):
            adopted += gallery.remove(both[start : start + 4096], space=old)
        if adopted:
            log.info("%d items already had a new vector; dropped their old one", adopted)
    todo = pending_ids(gallery, state)
    failed_before = {f.id for f in gallery.failures(new)}
    if not retry_failed:
        todo = [i for i in todo if i not in failed_before]
    metas = gallery.meta(todo) if order == "priority" else None
    todo = order_ids(todo, order, seed=state.seed,
                     priorities=[_priority(m) for m in metas] if metas is not None else None)
    if limit is not None:
        todo = todo[: max(0, int(limit))]
    report = RunReport(str(gallery.path), old, new, order, todo_before=len(todo),
                       adopted=adopted)
    pairs = PairStore(job_folder(gallery) / "pairs")
    want_pairs = max(0, state.calib_size - pairs.count())
    drop = [old] if state.mode == "online" else []
    run_started = time.time()
    _update_progress(gallery, run_started=run_started, moved=0, finished=False)
    last_save = time.perf_counter()
    buf_ids: list[str] = []
    buf_vecs: list[np.ndarray] = []

    def commit() -> None:
        nonlocal want_pairs
        if not buf_ids:
            return
        ids, vecs = list(buf_ids), np.concatenate(buf_vecs)
        buf_ids.clear()
        buf_vecs.clear()
        still = gallery.has(ids, old)  # removed meanwhile by someone else: do not resurrect
        if not still.all():
            ids = [i for i, s in zip(ids, still, strict=True) if s]
            vecs = vecs[still]
            if not ids:
                return
        if want_pairs > 0:
            m = min(want_pairs, len(ids))
            old_vecs = gallery.get_vectors(gallery.keys_of(ids[:m]), space=old)
            pairs.append(ids[:m], old_vecs, vecs[:m])  # before the move: old vectors go
            want_pairs -= m
        gallery.add(ids, vecs, space=new, drop_spaces=drop)
        report.moved += len(ids)
        _update_progress(gallery, run_started=run_started, moved=report.moved, finished=False)

    fails: list[Failure] = []
    try:
        for chunk_start in range(0, len(todo), 4096):
            chunk = todo[chunk_start : chunk_start + 4096]
            items: list[SourceItem] = []
            for item_id, meta in zip(chunk, gallery.meta(chunk), strict=True):
                it = _source_item(item_id, meta)
                if isinstance(it, Failure):
                    fails.append(it)
                else:
                    items.append(it)
            for batch in embed_stream(items, extractor, batch_size=batch_size, workers=workers,
                                      progress=progress):
                buf_ids.extend(it.id for it in batch.items)
                buf_vecs.append(batch.vectors)
                for it, why in batch.failures:
                    log.warning("cannot re-embed %s (%s): %s", it.id, it.path, why)
                    fails.append(Failure(it.id, str(it.path), why))
                if len(buf_ids) >= commit_every:
                    commit()
                if fails:
                    gallery.record_failures(new, fails)
                    report.failed.extend(fails)
                    fails = []
                if time.perf_counter() - last_save > save_every_s:
                    _save_indexes(gallery, state)
                    last_save = time.perf_counter()
        commit()
        if fails:
            gallery.record_failures(new, fails)
            report.failed.extend(fails)
    except KeyboardInterrupt:
        report.interrupted = True
        log.warning("interrupted after %d items; run again to continue", report.moved)
    report.remaining = len(pending_ids(gallery, state))
    report.seconds = time.perf_counter() - t0
    _update_progress(gallery, run_started=run_started, moved=report.moved, finished=True)
    if not report.interrupted:
        with contextlib.suppress(GalleriaError, OSError):
            gallery.compact(new)
            if state.mode == "online":
                gallery.compact(old)
    _save_indexes(gallery, state)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(Path(gallery.path) / "reports" / f"upgrade-run-{stamp}.json", report.to_dict())
    return report


def _save_indexes(gallery: Gallery, state: UpgradeState) -> None:
    """Save both spaces' indexes (a cache: failures are logged, never fatal)."""
    for space in (state.old_space, state.new_space):
        try:
            if gallery.count(space):
                gallery.index(space)
                gallery.save_index(space)
        except (GalleriaError, OSError, ImportError) as exc:
            log.warning("could not save the index of %s: %s", space, exc)


def _update_progress(gallery: Gallery, *, run_started: float, moved: int, finished: bool) -> None:
    prog = gallery.get_setting(PROGRESS_KEY) or {"runs": []}
    runs = [r for r in prog.get("runs", []) if r.get("started") != run_started]
    runs.append({"started": run_started, "moved": int(moved), "last": time.time(),
                 "finished": bool(finished)})
    prog["runs"] = runs[-50:]
    gallery.set_setting(PROGRESS_KEY, prog)


# --------------------------------------------------------------------------- #
# calibration pairs
# --------------------------------------------------------------------------- #


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
                o = np.load(self.folder / f"{stem}.old.npy", allow_pickle=False)
                n = np.load(self.folder / f"{stem}.new.npy", allow_pickle=False)
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


# --------------------------------------------------------------------------- #
# status
# --------------------------------------------------------------------------- #


@dataclass
class UpgradeStatus:
    """Where the backfill stands; see :func:`upgrade_status`."""

    gallery: str
    state: UpgradeState
    total: int
    done: int
    remaining: int
    failed: list[Failure]
    in_both: int
    in_neither: int
    rate: float | None
    eta_s: float | None
    running: bool
    pairs: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def consistent(self) -> bool:
        """Every item in exactly one space (online mode) / at least the old one (shadow)."""
        if self.state.mode == "online":
            return self.in_both == 0 and self.in_neither == 0
        return self.in_neither == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery,
            "old_space": self.state.old_space,
            "new_space": self.state.new_space,
            "new_model": self.state.new_model,
            "mode": self.state.mode,
            "order": self.state.order,
            "seed": self.state.seed,
            "total": self.total,
            "done": self.done,
            "remaining": self.remaining,
            "fraction": round(self.fraction, 6),
            "failed": len(self.failed),
            "failures": [f.to_dict() for f in self.failed[:50]],
            "items_per_s": None if self.rate is None else round(self.rate, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "running": self.running,
            "in_both_spaces": self.in_both,
            "in_neither_space": self.in_neither,
            "consistent": self.consistent,
            "calibration_pairs": self.pairs,
            "transforms": dict(self.state.transforms),
        }


def upgrade_status(gallery_path: str | os.PathLike[str]) -> UpgradeStatus:
    """Fraction done, throughput of the latest run, ETA, failures, and a consistency check."""
    with Gallery.open(gallery_path) as gallery:
        state = require_upgrade(gallery)
        all_ids = gallery.ids()
        old_ids = set(gallery.ids(state.old_space))
        new_ids = set(gallery.ids(state.new_space))
        remaining = [i for i in all_ids if i in old_ids and i not in new_ids]
        rem_set = set(remaining)
        failed = [f for f in gallery.failures(state.new_space) if f.id in rem_set]
        in_both = len(old_ids & new_ids)
        in_neither = sum(1 for i in all_ids if i not in old_ids and i not in new_ids)
        runs = (gallery.get_setting(PROGRESS_KEY) or {}).get("runs", [])
        rate = None
        running = False
        if runs:
            last = runs[-1]
            span = float(last["last"]) - float(last["started"])
            if last["moved"] > 0 and span > 0:
                rate = float(last["moved"]) / span
            running = not last.get("finished") and time.time() - float(last["last"]) < 600
            running = running and _lock_held(gallery)
        todo = len(remaining) - len(failed)
        eta = todo / rate if rate and todo else (0.0 if not todo else None)
        return UpgradeStatus(
            gallery=str(gallery.path), state=state, total=len(all_ids),
            done=len(all_ids) - len(remaining), remaining=len(remaining), failed=failed,
            in_both=in_both, in_neither=in_neither, rate=rate, eta_s=eta, running=running,
            pairs=PairStore(job_folder(gallery) / "pairs").count(),
        )


def _lock_held(gallery: Gallery) -> bool:
    p = job_folder(gallery) / "run.lock"
    if not p.exists():
        return False
    with open(p, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


# --------------------------------------------------------------------------- #
# finish
# --------------------------------------------------------------------------- #


@dataclass
class FinishReport:
    gallery: str
    old_space: str
    new_space: str
    items: int
    dropped_failed: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finish_upgrade(gallery_path: str | os.PathLike[str], *, force: bool = False) -> FinishReport:
    """At 100 %: make the new space primary and drop the old space entirely.

    Afterwards the gallery holds the same items and vectors as a fresh
    ``galleria index`` of the new model, and no trace of the job.

    Raises:
        UpgradeError: items are still pending (run first), or some items could
            not be re-embedded and ``force`` is not set (``force`` removes them).
    """
    t0 = time.perf_counter()
    with Gallery.open(gallery_path) as gallery:
        state = require_upgrade(gallery)
        if _lock_held(gallery):
            raise UpgradeError("an `upgrade run` is still working on this gallery; wait or stop it")
        old, new = state.old_space, state.new_space
        new_ids = set(gallery.ids(new))
        remaining = [i for i in gallery.ids(old) if i not in new_ids]
        failures = {f.id: f for f in gallery.failures(new)} if _has_space(gallery, new) else {}
        failed = [i for i in remaining if i in failures]
        pending = len(remaining) - len(failed)
        total = len(gallery)
        if pending:
            raise UpgradeError(
                f"the backfill is at {100.0 * (total - len(remaining)) / max(total, 1):.1f} %: "
                f"{pending} of {total} items are still in the old space; run "
                "`galleria upgrade run` until it reaches 100 % before finishing"
            )
        if failed and not force:
            shown = "; ".join(f"{i}: {failures[i].reason}" for i in failed[:5])
            raise UpgradeError(
                f"{len(failed)} items could not be re-embedded with the new model ({shown}); "
                "fix them and run `galleria upgrade run --retry-failed`, or finish with "
                "--force to remove them from the gallery"
            )
        if failed:
            log.warning("removing %d items that could not be re-embedded", len(failed))
            gallery.remove(failed)
        if state.mode == "shadow" and _has_space(gallery, old):
            gallery.remove(gallery.ids(old), space=old)
        gallery.set_primary_space(new)
        if _has_space(gallery, old):
            drop_space(gallery, old)
        gallery.compact(new)
        gallery.build_index(new, save=True)
        items = len(gallery)
        _delete_settings(gallery, [STATE_KEY, PROGRESS_KEY])
        report = FinishReport(str(gallery.path), old, new, items, failed,
                              time.perf_counter() - t0)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        write_json(Path(gallery.path) / "reports" / f"upgrade-finish-{stamp}.json",
                   {**report.to_dict(), "job": state.to_dict()})
        shutil.rmtree(job_folder(gallery), ignore_errors=True)
        return report


def _has_space(gallery: Gallery, space: str) -> bool:
    return any(s.space == space for s in gallery.spaces())


def drop_space(gallery: Gallery, space: str) -> None:
    """Delete an *empty* space (the old one, at finish)."""
    if gallery.count(space):
        raise UpgradeError(f"space {space!r} still holds {gallery.count(space)} vectors")
    gallery.drop_space(space)


def _delete_settings(gallery: Gallery, keys: Sequence[str]) -> None:
    for key in keys:
        gallery.delete_setting(key)


def describe(state: UpgradeState) -> str:
    return json.dumps(state.to_dict(), indent=2, sort_keys=True)
