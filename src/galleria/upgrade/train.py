"""``galleria upgrade train-transform``: train psi (or a BCT head) for a gallery's upgrade.

Paired embeddings come either from a set of images embedded with both models
of the job (a folder or CSV manifest; labels from a manifest column), or from
the (old, new) pairs the backfill itself has collected (``from_job``; no
labels, so regression only). The map is saved into the job folder (or ``out``)
and attached to the job, so ``upgrade search --rule psi`` finds it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galleria.cache import cache_dir
from galleria.errors import InputError
from galleria.extract.embed import Progress, embed_items
from galleria.extract.spaces import extractor_from_space
from galleria.extractors.base import Extractor
from galleria.fingerprint import digest, slug
from galleria.images.sources import SourceItem, list_source, split_problems
from galleria.io.atomic import load_array, read_json, write_json, write_npy
from galleria.store.gallery import Gallery
from galleria.upgrade.bct import BCTHead
from galleria.upgrade.config import TrainConfig, with_options
from galleria.upgrade.online import OnlineConfig, check_and_publish, query_models
from galleria.upgrade.pairs import load_pairs
from galleria.upgrade.phi_online import phi_for_check
from galleria.upgrade.psi import CrossModelMap, ReverseTransform
from galleria.upgrade.state import (
    UpgradeError,
    attach_transform,
    job_folder,
    require_upgrade,
    run_lock,
)

log = logging.getLogger(__name__)

KINDS = ("regression", "metric-compatible", "bct")


def make_map(kind: str, **params: Any) -> CrossModelMap:
    """A fresh, unfitted map of ``kind`` (``regression``, ``metric-compatible``, ``bct``)."""
    if kind == "bct":
        return BCTHead(**params)
    if kind in ("regression", "metric-compatible"):
        return ReverseTransform(loss=kind, **params)
    raise InputError(f"unknown transform kind {kind!r}; known: {KINDS}")


def embed_cached(
    items: Sequence[SourceItem],
    extractor: Extractor,
    *,
    batch_size: int = 32,
    workers: int = 2,
    progress: Progress | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors (N, D), ok (N,))`` of items, cached per (file list, model fingerprint)."""
    key = digest([(it.id, str(it.path), it.bbox) for it in items], extractor.fingerprint)
    base = cache_dir("upgrade-pairs") / f"{slug(extractor.fingerprint)}-{key}"
    header, array, okf = Path(f"{base}.json"), Path(f"{base}.npy"), Path(f"{base}.ok.npy")
    fresh = use_cache and header.is_file() and array.is_file() and okf.is_file()
    if fresh and read_json(header).get("fingerprint") == extractor.fingerprint:
        if progress is not None:
            progress.update(len(items))
        return load_array(array), load_array(okf)
    vecs, ok, fails = embed_items(items, extractor, batch_size=batch_size, workers=workers,
                                  progress=progress)
    for it, why in fails[:5]:
        log.warning("training image %s unusable: %s", it.path, why)
    write_npy(array, vecs)
    write_npy(okf, ok)
    write_json(header, {"type": "upgrade-pair-embeddings", "format_version": 1,
                        "fingerprint": extractor.fingerprint, "n": len(items)})
    return vecs, ok


@contextlib.contextmanager
def job_writer(gallery: Gallery) -> Iterator[None]:
    """Hold the job's run lock (:func:`~galleria.upgrade.state.run_lock`) while
    train-transform writes the job record (the attached map, the checked decision): an
    ``upgrade run`` publishes its online checks into the same record, so the two never
    overlap. Refused at once while a run holds it."""
    lock = run_lock(gallery, "galleria upgrade train-transform")
    try:
        lock.__enter__()
    except UpgradeError as exc:
        raise UpgradeError(
            f"{exc}: train-transform writes the same job record; run it when the run has "
            "stopped (Ctrl-C keeps everything committed; the run also learns psi from its "
            "own pairs)") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def train_transform(
    gallery_path: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    progress: Progress | None = None,
    train_progress: Any = None,
    **options: Any,
) -> tuple[Path, CrossModelMap]:
    """Train a new -> old map for the gallery's upgrade, save it and attach it to the job.

    Args:
        config: a :class:`~galleria.upgrade.config.TrainConfig` (kind, training
            images or ``from_job``, labels, split, out, params...); ``options``:
            keyword overrides of its fields (``kind="bct"``).
        progress: ``update(n)`` per embedded training image.
        train_progress: progress of the map's training epochs.

    Returns:
        ``(saved folder, fitted map)``.
    """
    cfg = with_options(TrainConfig, config, options, what="train_transform")
    kind, images, from_job, label_column = cfg.kind, cfg.images, cfg.from_job, cfg.label_column
    split_column, split, out, params = cfg.split_column, cfg.split, cfg.out, cfg.params
    runtime, threads, batch_size, workers = cfg.runtime, cfg.threads, cfg.batch_size, cfg.workers
    if (images is None) == (not from_job):
        raise InputError("give either training images (--images) or --from-job")
    needs_labels = kind in ("metric-compatible", "bct")
    if needs_labels and label_column is None:
        raise InputError(f"{kind} training needs labels: pass --label-column")
    with Gallery.open(gallery_path) as gallery, contextlib.ExitStack() as held:
        state = require_upgrade(gallery)
        # the job's run lock: a run's check publishing meanwhile would lose a write
        held.enter_context(job_writer(gallery))
        labels = None
        if from_job:
            if needs_labels:
                raise InputError("the job's pairs carry no labels: --from-job trains regression")
            _, old, new = load_pairs(gallery.path)
            if len(old) < 8:
                raise InputError(f"the job has collected only {len(old)} pairs; run more first")
        else:
            assert images is not None
            items, skipped = split_problems(list_source(images))
            for it in skipped:
                log.warning("training images: skipped %s: %s", it.path, it.problem)
            if split_column is not None:
                items = [it for it in items if it.meta.get(split_column) == split]
            if label_column is not None:
                missing = [it.id for it in items if not it.meta.get(label_column)]
                if missing:
                    raise InputError(
                        f"{len(missing)} training images have no {label_column!r} value "
                        f"(e.g. {missing[:3]}); is it a manifest column?"
                    )
            if len(items) < 8:
                raise InputError(f"only {len(items)} training images selected")
            old_ext = extractor_from_space(
                gallery.space_info(state.old_space).info, root=gallery.path, runtime=runtime,
                threads=threads)
            new_ext = extractor_from_space(
                gallery.space_info(state.new_space).info, root=gallery.path, runtime=runtime,
                threads=threads)
            old, ok_o = embed_cached(items, old_ext, batch_size=batch_size, workers=workers,
                                     progress=progress)
            new, ok_n = embed_cached(items, new_ext, batch_size=batch_size, workers=workers,
                                     progress=progress)
            ok = ok_o & ok_n
            old, new = old[ok], new[ok]
            if label_column is not None:
                labels = np.array([it.meta[label_column] for it, o in zip(items, ok, strict=True)
                                   if o])
        the_map = make_map(kind, **(params or {}))
        the_map.fit(new, old, labels=labels, new_fingerprint=state.new_space,
                    old_fingerprint=state.old_space, progress=train_progress)
        folder = Path(out) if out is not None else job_folder(gallery) / "transforms" / kind
        the_map.save(folder)
        attach_transform(gallery, kind, folder)
        if kind == "regression" and state.mode == "online":
            # `auto` search switches to it only if it beats rank-merge on pseudo-queries
            state = require_upgrade(gallery)
            old_q, new_q = query_models(gallery, state, runtime=runtime, threads=threads)
            phi, _ = phi_for_check(gallery, state, lambda: None)  # the job's, kept
            check_and_publish(gallery, the_map, folder,
                              config=OnlineConfig.from_dict(state.online.get("config")),
                              old_model=old_q, new_model=new_q, source="train-transform",
                              phi=phi)
        return folder, the_map
