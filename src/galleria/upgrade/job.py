"""The backfill job: move a live gallery from an old model's space to a new one's.

Lifecycle (one function per step, each resumable)::

    start_upgrade(G, "effnet-lite2")   register the new space, record the job
    run_upgrade(G, limit=...)          re-embed items in batches (repeat until done)
    upgrade_status(G)                  fraction done, rate, ETA, failures, consistency
    finish_upgrade(G)                  at 100 %: drop the old space, new one is primary

State (upgrade/state.py) lives in the gallery; nothing of it survives
:func:`finish_upgrade` (upgrade/finish.py, which is safe to kill at any point).

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
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, GalleriaError, InputError
from galleria.extract.embed import Embedder, Progress, embed_stream
from galleria.extract.spaces import extractor_from_space, space_info
from galleria.extractors.base import Extractor
from galleria.extractors.registry import create_extractor
from galleria.images.decode import parse_bbox
from galleria.images.sources import SourceItem
from galleria.io.atomic import write_json
from galleria.store.gallery import Failure, Gallery
from galleria.upgrade.config import RunConfig, StartConfig, with_options
from galleria.upgrade.finish import FinishReport, UpgradeStatus, finish_upgrade, upgrade_status
from galleria.upgrade.local_guard import LocalGuardRun
from galleria.upgrade.local_search import LocalPublisher
from galleria.upgrade.online import (
    OnlineConfig,
    online_run_start,
    online_run_step,
    train_pairs,
)
from galleria.upgrade.pairs import PairStore, load_pairs
from galleria.upgrade.querylog import query_order
from galleria.upgrade.state import (
    FINISHING_KEY,
    JOB_VERSION,
    MODES,
    ORDERS,
    PROGRESS_KEY,
    STATE_KEY,
    UpgradeError,
    UpgradeState,
    active_upgrade,
    attach_transform,
    job_folder,
    require_upgrade,
    run_lock,
    save_state,
    transform_path,
)
from galleria.upgrade.stored import transform_embedder

log = logging.getLogger(__name__)

__all__ = [
    "FINISHING_KEY",
    "JOB_VERSION",
    "MODES",
    "ORDERS",
    "PROGRESS_KEY",
    "STATE_KEY",
    "FinishReport",
    "PairStore",
    "RunReport",
    "UpgradeError",
    "UpgradeState",
    "UpgradeStatus",
    "active_upgrade",
    "attach_transform",
    "check_can_start",
    "finish_upgrade",
    "job_folder",
    "load_pairs",
    "order_ids",
    "pending_ids",
    "require_upgrade",
    "run_upgrade",
    "start_upgrade",
    "transform_path",
    "upgrade_status",
]


# --------------------------------------------------------------------------- #
# start
# --------------------------------------------------------------------------- #


def start_upgrade(
    gallery_path: str | os.PathLike[str],
    new_model: str,
    config: StartConfig | None = None,
    *,
    extractor: Extractor | None = None,
    **options: Any,
) -> UpgradeState:
    """Create the job: register the new model's space (with its recipe) and record it.

    Args:
        gallery_path: an existing gallery; its primary space is the old model.
        new_model: registry name of the new model (``effnet-lite2``...), built
            with the config's ``pooling``... as ``galleria index`` would.
        config: a :class:`~galleria.upgrade.config.StartConfig` (mode, order,
            seed, calib_size, online psi, model options); ``options``: keyword
            overrides of its fields (``order="random"``).
        extractor: the new model itself (instead of building ``new_model``).

    Raises:
        InputError: an unknown option or value.
        UpgradeError: an upgrade is already in progress, or the gallery already
            uses ``new_model`` (same fingerprint).
    """
    cfg = with_options(StartConfig, config, options, what="start_upgrade")
    mode, order, seed, calib_size = cfg.mode, cfg.order, cfg.seed, cfg.calib_size
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}")
    if calib_size < 0:
        raise InputError(f"calib_size must be >= 0, got {calib_size}")
    with Gallery.open(gallery_path) as gallery:
        check_can_start(gallery)
        old = gallery.primary_space
        if old is None:
            raise UpgradeError(f"gallery {gallery.path} is empty: nothing to upgrade")
        old_info = gallery.space_info(old)
        if extractor is None:
            extra = {k: v for k, v in (("size", cfg.size), ("resize", cfg.resize))
                     if v is not None}
            extractor = create_extractor(
                new_model, pooling=cfg.pooling, scales=cfg.scales, checkpoint=cfg.checkpoint,
                runtime=cfg.runtime, threads=cfg.threads, **extra,
            )
        new = extractor.fingerprint
        uses = _models_under(gallery, old)  # the primary space and the spaces it derives from
        if new in uses:
            how = "" if new == old else f" (its primary space {old!r} is that model's output " \
                "through a fitted transform)"
            raise UpgradeError(
                f"gallery {gallery.path} already uses {new_model!r} (fingerprint {new!r}){how}; "
                "an upgrade needs a different model or different settings"
            )
        if "config" not in old_info.info:
            log.warning("old space %s records no extractor config: rank-merge needs old query "
                        "vectors", old)
        gallery.register_space(new, extractor.dim, space_info(extractor), kind=extractor.kind)
        state = UpgradeState(
            old_space=old, new_space=new, new_model=new_model, mode=mode, order=order,
            seed=int(seed), calib_size=int(calib_size), started=time.time(),
            online={"config": (cfg.online or OnlineConfig(seed=int(seed))).to_dict()},
        )
        save_state(gallery, state)
        gallery.set_setting(PROGRESS_KEY, {"runs": []})
        job_folder(gallery).mkdir(parents=True, exist_ok=True)
        log.info("upgrade %s -> %s started (%s, order %s)", old, new, mode, order)
        return state


def check_can_start(gallery: Gallery) -> None:
    """Raise UpgradeError when a job (or the clean-up of one) is in progress."""
    if gallery.get_setting(FINISHING_KEY):
        raise UpgradeError(f"the previous upgrade of {gallery.path} did not finish its "
                           "clean-up; run `galleria upgrade finish` first")
    current = active_upgrade(gallery)
    if current is not None:
        raise UpgradeError(
            f"an upgrade to {current.new_space!r} is already in progress on {gallery.path}; "
            "finish it first (`galleria upgrade status` shows how far it is)"
        )


def _models_under(gallery: Gallery, space: str) -> set[str]:
    """``space`` and the spaces it was computed from (a transform's base, recursively)."""
    infos = {s.space: s.info for s in gallery.spaces()}
    out = {space}
    while (base := infos.get(space, {}).get("base_space")
           or infos.get(space, {}).get("base_fingerprint")) and base not in out:
        out.add(base)
        space = base
    return out


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
    ``queries``: the same; the run then moves the items the service's recent
    answers returned to the front as it goes (:mod:`galleria.upgrade.querylog`).
    ``id``: as given (the gallery's insertion order). ``priority``: highest
    ``priorities`` first, ties in the given order.
    """
    if order in ("random", "queries"):
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


def _priority(meta: dict[str, Any] | None) -> float:
    try:
        return float((meta or {}).get("priority", 0.0))
    except (TypeError, ValueError):
        return 0.0


def _source_item(item_id: str, meta: dict[str, Any] | None) -> SourceItem | Failure:
    """The image of a gallery item, from its stored metadata."""
    m = meta or {}
    path = m.get("path")
    if not path:
        return Failure(item_id, "", "no image path stored in the item's metadata")
    try:  # a bad stored record fails this item (reported), never the run
        box = parse_bbox(m.get("bbox"))
    except InputError as exc:
        return Failure(item_id, str(path), f"its stored crop box is invalid: {exc}")
    return SourceItem(id=item_id, path=Path(path), bbox=box)


def run_upgrade(
    gallery_path: str | os.PathLike[str],
    config: RunConfig | None = None,
    *,
    extractor: Extractor | None = None,
    progress: Progress | None = None,
    embedder: Embedder | None = None,
    **options: Any,
) -> RunReport:
    """Re-embed pending items with the new model and move them, batch by batch.

    Args:
        config: a :class:`~galleria.upgrade.config.RunConfig` (limit, order,
            batch sizes, commit_every, retry_failed...); ``options``: keyword
            overrides of its fields (``limit=100``).
        extractor: the new model (default: rebuilt from the new space's recipe,
            fingerprint checked).
        progress: ``update(n)`` per processed image.
        embedder: where embeddings are computed (default :func:`embed_stream`, in this
            process; :class:`galleria.distributed.ray_embed.RayEmbedder`: on a Ray
            cluster). What is pending, the commits and the failures are the same.

    Returns:
        RunReport; ``interrupted`` is True after Ctrl-C (everything committed
        before it is kept; run again to continue).
    """
    t0 = time.perf_counter()
    cfg = with_options(RunConfig, config, options, what="run_upgrade")
    commit_every = cfg.commit_every
    if commit_every < 1:
        raise InputError(f"commit_every must be >= 1, got {commit_every}")
    gallery = Gallery.open(gallery_path)
    try:
        state = require_upgrade(gallery)
        order = cfg.order or state.order
        if order not in ORDERS:
            raise InputError(f"order must be one of {ORDERS}, got {order!r}")
        with run_lock(gallery):
            state = require_upgrade(gallery)  # a finish may have switched meanwhile
            return _run(gallery, state, order=order, limit=cfg.limit, extractor=extractor,
                        runtime=cfg.runtime, threads=cfg.threads, batch_size=cfg.batch_size,
                        workers=cfg.workers, commit_every=commit_every,
                        retry_failed=cfg.retry_failed, save_every_s=cfg.save_every_s,
                        progress=progress, t0=t0,
                        embedder=embedder or embed_stream)
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
    embedder: Embedder = embed_stream,
) -> RunReport:
    old, new = state.old_space, state.new_space
    if state.change == "transform":
        extractor, embedder = transform_embedder(gallery, state)  # type: ignore[assignment]
    elif extractor is None:
        extractor = extractor_from_space(gallery.space_info(new).info, root=gallery.path,
                                         runtime=runtime, threads=threads)
    elif extractor.fingerprint != new:
        raise CompatibilityError(
            f"the extractor makes {extractor.fingerprint!r} but the upgrade is to {new!r}"
        )
    moves = state.mode == "online" and state.change == "model"
    adopted = 0
    if moves:
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
    todo = order_ids(todo, "random" if order == "queries" else order, seed=state.seed,
                     priorities=[_priority(m) for m in metas] if metas is not None else None)
    n_todo = len(todo) if limit is None else min(len(todo), max(0, int(limit)))
    report = RunReport(str(gallery.path), old, new, order, todo_before=n_todo,
                       adopted=adopted)
    online = OnlineConfig.from_dict(state.online.get("config")) if state.online else \
        OnlineConfig(enabled=False)
    online_on = online.enabled and moves
    pairs = PairStore(job_folder(gallery) / "pairs")
    more_pairs = train_pairs(gallery)
    paired = moves or state.change == "transform"  # the old vector is there to pair with
    want_pairs = max(0, state.calib_size - pairs.count()) if paired else 0
    want_train = max(0, online.max_pairs - pairs.count() - more_pairs.count()) if online_on \
        else 0
    query_models: list[Extractor | None] = []
    if online_on and n_todo:
        online_run_start(gallery, online, extractor, query_models, runtime, threads)
    elif online_on:  # nothing to move: a check the last run did not make (killed) is due
        online_run_step(gallery, online, extractor, query_models, runtime, threads)
    drop = [old] if moves else []
    run_started = time.time()
    _update_progress(gallery, run_started=run_started, moved=0, finished=False)
    last_save = time.perf_counter()
    buf_ids: list[str] = []
    buf_data: list[Any] = []
    fails: list[Failure] = []
    local = extractor.kind == "local"
    publisher = LocalPublisher(new)
    guard = LocalGuardRun(gallery, state, extractor, publisher, runtime=runtime,
                          threads=threads) if state.change == "local" else None
    if guard is not None and n_todo:  # the job's first check: before the first item
        guard.maybe(source="start")
    reads_images = state.change != "transform"

    def keep_pairs(ids: list[str], vecs: np.ndarray) -> None:
        nonlocal want_pairs, want_train
        still = gallery.has(ids, old)
        rows = [n for n, s in enumerate(still) if s]
        cohort, rest = rows[:want_pairs], rows[want_pairs:][:want_train]
        if not cohort and not rest:
            return
        try:  # before the move: the old vectors go with it
            old_vecs = gallery.get_vectors(gallery.keys_of([ids[n] for n in cohort + rest]),
                                           space=old)
        except GalleriaError:  # an item was removed meanwhile: no pairs from this batch
            return
        if cohort:
            pairs.append([ids[n] for n in cohort], old_vecs[: len(cohort)], vecs[cohort])
            want_pairs -= len(cohort)
        if rest:
            more_pairs.append([ids[n] for n in rest], old_vecs[len(cohort):], vecs[rest])
            want_train -= len(rest)

    hot: dict[str, float] = {}
    hot_old: dict[str, np.ndarray] = {}  # old vectors of answered items moved by this run

    def keep_hot(ids: list[str]) -> None:
        """Before a move: the old vectors of answered items, to find their neighbours later."""
        want = [i for i in ids if i in hot]
        if not want:
            return
        with contextlib.suppress(GalleriaError):
            vecs = gallery.get_vectors(gallery.keys_of(want), space=old)
            hot_old.update(zip(want, vecs, strict=True))
            while len(hot_old) > HOT_MEMORY:
                hot_old.pop(next(iter(hot_old)))

    def known_old(ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Old vectors of moved items: kept by this run, else from the job's pairs."""
        missing = [i for i in ids if i not in hot_old]
        if missing:
            for store in (pairs, more_pairs):
                hot_old.update(store.lookup(missing))
        return {i: hot_old[i] for i in ids if i in hot_old}

    def commit() -> None:
        if not buf_ids:
            return
        ids = list(buf_ids)
        buf_ids.clear()
        if moves and order == "queries":
            keep_hot(ids)
        if local:
            feats = [f for chunk in buf_data for f in chunk]
            buf_data.clear()
            keys = gallery.add_local(ids, feats, space=new, only_if_in=old)
            published = publisher.maybe(gallery)  # the index search serves, built here
            if guard is not None:  # the old-answers guard, when due (upgrade/local_guard.py)
                guard.maybe(published=published)
        else:
            vecs = np.concatenate(buf_data)
            buf_data.clear()
            if want_pairs > 0 or want_train > 0:
                keep_pairs(ids, vecs)
            # only_if_in: an item removed meanwhile by someone else is skipped in the same
            # transaction that moves the others (never resurrected, never a crash)
            keys = gallery.add(ids, vecs, space=new, drop_spaces=drop, only_if_in=old)
        report.moved += int((keys >= 0).sum())
        _update_progress(gallery, run_started=run_started, moved=report.moved, finished=False)
        if online_on:
            online_run_step(gallery, online, extractor, query_models, runtime, threads)

    def source() -> Any:
        """Pending items in the run's order; ``queries`` re-reads the answers as it goes."""
        remaining, served = list(todo), 0
        while remaining and served < n_todo:
            if order == "queries":
                remaining, weights = query_order(gallery, remaining, space=old,
                                                 known=known_old)
                hot.clear()
                hot.update(weights)
            step = QUERY_REFRESH if order == "queries" else 4096
            chunk, remaining = remaining[:step], remaining[step:]
            chunk = chunk[: n_todo - served]
            served += len(chunk)
            for item_id, meta in zip(chunk, gallery.meta(chunk), strict=True):
                it = _source_item(item_id, meta) if reads_images else \
                    SourceItem(id=item_id, path=Path(str((meta or {}).get("path") or ".")))
                if isinstance(it, Failure):
                    fails.append(it)
                else:
                    yield it

    try:
        for batch in embedder(source(), extractor, batch_size=batch_size, workers=workers,
                              progress=progress):
            buf_ids.extend(it.id for it in batch.items)
            buf_data.append(batch.features if local else batch.vectors)
            for it, why in batch.failures:
                log.warning("cannot re-embed %s (%s): %s", it.id, it.path, why)
                fails.append(Failure(it.id, str(it.path), why))
            if len(buf_ids) >= commit_every:
                commit()
            if fails:
                gallery.record_failures(new, fails)
                report.failed.extend(fails)
                fails.clear()
            if time.perf_counter() - last_save > save_every_s:
                _save_indexes(gallery, state)
                last_save = time.perf_counter()
        commit()
        if fails:
            gallery.record_failures(new, fails)
            report.failed.extend(fails)
        if online_on and n_todo:  # the check once only failed items are left
            online_run_step(gallery, online, extractor, query_models, runtime, threads)
    except KeyboardInterrupt:
        report.interrupted = True
        log.warning("interrupted after %d items; run again to continue", report.moved)
    report.remaining = len(pending_ids(gallery, state))
    report.seconds = time.perf_counter() - t0
    _update_progress(gallery, run_started=run_started, moved=report.moved, finished=True)
    if not report.interrupted:
        with contextlib.suppress(GalleriaError, OSError):
            gallery.compact(new)
            if moves:
                gallery.compact(old)
    _save_indexes(gallery, state)
    if guard is not None and not report.interrupted:  # the last item done: check it
        guard.maybe(source="end", published=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(Path(gallery.path) / "reports" / f"upgrade-run-{stamp}.json", report.to_dict())
    return report


QUERY_REFRESH = 256
"""Items between two readings of the service's answers in the ``queries`` order."""
HOT_MEMORY = 2000
"""Old vectors of answered items a run keeps after moving them (to find their neighbours)."""


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


