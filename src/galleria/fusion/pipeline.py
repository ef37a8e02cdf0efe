"""``galleria fusion train`` as a function: manifest in, fusion model folder out, resumable.

Steps (each resumable; a rerun after ``kill -9`` redoes at most one commit, one
view part or one epoch):

1. embed the training images with every member into a feature store (one
   space per member) under ``work/features.gallery``;
2. compute the frozen query trunk's outputs on ``n_views`` views per image
   (``work/views-*``);
3. train mixer and query tail (:func:`galleria.fusion.train.fit_fusion`),
   checkpointing ``work/checkpoint.safetensors`` after every epoch;
4. write the fusion model folder (:class:`galleria.fusion.model.FusionModel`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galleria.errors import GalleriaError, InputError
from galleria.fingerprint import digest
from galleria.fusion.data import compute_views, fill_features, load_features, manifest_labels
from galleria.fusion.extractor import _lite_preprocessing
from galleria.fusion.members import DEFAULT_TOP_N, build_member, input_spec
from galleria.fusion.model import FusionModel
from galleria.fusion.options import options_of
from galleria.fusion.query_model import build, query_weights_id, trunk_runner
from galleria.fusion.recipe import DEFAULT_MEMBERS
from galleria.fusion.train import FusionRecipe, TrainingData, fit_fusion
from galleria.images.sources import list_source
from galleria.store.gallery import Gallery

log = logging.getLogger(__name__)

#: What ``galleria fusion train`` uses when no member list is given.


@dataclass(frozen=True)
class TrainRun:
    """How a training run executes (not what it learns: that is the
    :class:`~galleria.fusion.train.FusionRecipe`).

    Attributes:
        threads: intra-op threads of the models (``None``: the process default).
        batch_size: images per member forward pass.
        workers: image decoding threads.
        progress: tqdm-like factory ``progress(total=, desc=, unit=)``.
        checkpoint_seconds: least time between two training checkpoints (a kill loses at
            most this much training; see :func:`galleria.fusion.train.fit_fusion`).
    """

    threads: int | None = None
    batch_size: int = 32
    workers: int = 2
    progress: Callable[..., Any] | None = None
    checkpoint_seconds: float = 60.0


def train_from_manifest(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    gallery_models: Sequence[str] = DEFAULT_MEMBERS,
    label_column: str | None = None,
    recipe: FusionRecipe | None = None,
    work: str | os.PathLike[str] | None = None,
    top_n: int = DEFAULT_TOP_N,
    run: TrainRun | None = None,
    **run_options: Any,
) -> dict[str, Any]:
    """Train a fusion model on the images of ``images`` (folder or CSV manifest) into ``out``.

    Args:
        gallery_models: member names (see :func:`galleria.fusion.members.build_member`).
        label_column: manifest column of class / instance labels; ``None`` = instance
            discrimination (one class per image, phone-like views).
        work: cache folder (features, views, checkpoint); default ``<out>.work``.
        run: how it runs (:class:`TrainRun`); or give its fields as keywords
            (``threads=2, progress=...``).

    Returns:
        A JSON-able report (counts, seconds per step, training summary, fingerprint).
    """

    run = options_of(TrainRun, run, run_options)
    recipe = recipe or FusionRecipe()
    if not gallery_models:
        raise InputError("--gallery-models needs at least one member model")
    t0 = time.perf_counter()
    items = list_source(images)
    work_dir = Path(work) if work is not None else Path(f"{os.fspath(out)}.work")
    work_dir.mkdir(parents=True, exist_ok=True)
    with _work_lock(work_dir):
        return _train(items, out, work_dir, gallery_models, label_column, recipe, top_n,
                      run, t0, images)


@contextlib.contextmanager
def _work_lock(work_dir: Path) -> Iterator[None]:
    """One trainer per work folder (a second one is refused; the lock dies with its process)."""
    import fcntl  # lazy: posix

    fh = open(work_dir / ".lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GalleriaError(
                f"another `galleria fusion train` is using {work_dir}; wait for it or pass "
                "another --work / --out") from None
        yield
    finally:
        fh.close()


def _train(items: list[Any], out: str | os.PathLike[str], work_dir: Path,
           gallery_models: Sequence[str], label_column: str | None, recipe: FusionRecipe,
           top_n: int, run: TrainRun, t0: float, images: Any) -> dict[str, Any]:
    threads, batch_size, workers, progress = run.threads, run.batch_size, run.workers, \
        run.progress
    checkpoint_seconds = run.checkpoint_seconds
    members = [build_member(n, threads=threads, top_n=top_n) for n in gallery_models]
    specs = [input_spec(m) for m in members]
    if len({s.fingerprint for s in specs}) != len(specs):
        raise InputError(f"a member is listed twice: {list(gallery_models)}")
    report: dict[str, Any] = {"images": len(items), "members": [s.to_dict() for s in specs]}

    store = Gallery.open_or_create(work_dir / "features.gallery")
    try:
        bar = progress(total=len(items) * len(members), desc="member features", unit="img") \
            if progress else None
        try:
            failures = fill_features(store, items, members, batch_size=batch_size,
                                     workers=workers, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        bad = {i for f in failures.values() for i, _ in f}
        for space, fl in failures.items():
            for i, why in fl[:5]:
                log.warning("%s: skipped %s: %s", space, i, why)
        items = [it for it in items if it.id not in bad]
        if len(items) < 4:
            raise InputError(f"only {len(items)} usable training images")
        feats = load_features(store, [it.id for it in items], [s.fingerprint for s in specs])
    finally:
        store.close()
    report["skipped"] = sorted(bad)
    report["features_seconds"] = round(time.perf_counter() - t0, 2)
    labels = manifest_labels(items, label_column)

    t1 = time.perf_counter()
    trunk, _ = build(recipe.query_model, recipe.train_blocks, recipe.d)

    wid = query_weights_id(recipe.query_model)
    trunk_id = digest(recipe.query_model, wid, recipe.train_blocks)
    run_trunk = trunk_runner(trunk, work_dir / f"trunk-{trunk_id}.onnx", threads=threads)
    bar = progress(total=len(items), desc="query views", unit="img") if progress else None
    try:
        views = compute_views(items, run_trunk, _lite_preprocessing(), work_dir,
                              trunk_id=trunk_id,
                              n_views=recipe.n_views, seed=recipe.seed, workers=workers,
                              progress=bar)
    finally:
        if bar is not None:
            bar.close()
    report["views_seconds"] = round(time.perf_counter() - t1, 2)

    data = TrainingData(specs, feats, views, labels)
    result = fit_fusion(data, recipe, checkpoint=work_dir / "checkpoint.safetensors",
                        progress=progress, checkpoint_seconds=checkpoint_seconds)
    training = {**result.summary(), "labels": label_column or "instance discrimination",
                "images": len(items), "manifest": os.fspath(images)}
    model = FusionModel(
        members=[{"config": m.config(), "fingerprint": m.fingerprint} for m in members],
        specs=specs, mixer=result.mixer,
        mixer_params=recipe.mixer_params(),
        tail=result.tail,
        query_params=recipe.query_params(wid),
        recipe=recipe.to_dict(), training=training,
    )
    model.save(out, trunk=trunk)
    report.update({"fingerprint": model.fingerprint, "out": os.fspath(out),
                   "train_seconds": round(result.seconds, 2),
                   "total_seconds": round(time.perf_counter() - t0, 2),
                   "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                   "resumed_from": result.resumed_from, "n_train": result.n_train,
                   "n_val": result.n_val, "classes": result.n_classes})
    return report
