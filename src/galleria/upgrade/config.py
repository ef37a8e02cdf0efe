"""Options of the job's steps as dataclass configs (``start``, ``run``, ``train-transform``).

Each step takes a config and/or keyword overrides of its fields, so both work::

    start_upgrade(G, "effnet-lite2", StartConfig(order="random", seed=3))
    start_upgrade(G, "effnet-lite2", order="random", seed=3)

An unknown keyword is an :class:`~galleria.errors.InputError` naming the known ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from galleria.errors import InputError
from galleria.upgrade.online import OnlineConfig

C = TypeVar("C")


def with_options(cls: type[C], config: C | None, options: Mapping[str, Any], *,
                 what: str) -> C:
    """``config`` (default ``cls()``) with the fields in ``options`` replaced.

    Raises:
        InputError: ``config`` is not a ``cls``, or ``options`` names a field ``cls``
            does not have.
    """
    if config is not None and not isinstance(config, cls):
        raise InputError(f"{what} takes a {cls.__name__}, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"{what} has no option {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    base = config if config is not None else cls()
    return dataclasses.replace(base, **options) if options else base  # type: ignore[type-var]


@dataclass(frozen=True)
class StartConfig:
    """Options of :func:`~galleria.upgrade.job.start_upgrade`.

    Attributes:
        pooling, scales, checkpoint, size, resize, runtime, threads: how the new
            model is built (as ``galleria index`` builds it).
        mode: ``online`` (move items, merged search) or ``shadow`` (old-only
            search until finish).
        order: default order of the run: ``queries`` (items recent answers of the
            service returned, and their neighbours, first; then ``random``),
            ``random`` (seeded by ``seed``), ``id`` (insertion order), ``priority``
            (item meta ``priority``, highest first).
        calib_size: (old, new) pairs the run keeps as the calibration cohort (0: none).
        online: how psi is learned while the job runs (default ``OnlineConfig(seed)``;
            ``OnlineConfig(enabled=False)``: not at all).
    """

    pooling: str | None = None
    scales: Sequence[float] = (1.0,)
    checkpoint: str | None = None
    size: int | None = None
    resize: str | None = None
    runtime: str = "auto"
    threads: int | None = None
    mode: str = "online"
    order: str = "queries"
    seed: int = 0
    calib_size: int = 1000
    online: OnlineConfig | None = None


@dataclass(frozen=True)
class RunConfig:
    """Options of :func:`~galleria.upgrade.job.run_upgrade`.

    Attributes:
        limit: process at most this many pending items (then stop; run again).
        order: override the job's order (``queries``, ``random``, ``id``, ``priority``).
        runtime, threads: how the new model runs (when rebuilt from its recipe).
        batch_size, workers: embedding batch size and image-decoding threads.
        commit_every: items per committed transaction (the most a crash loses).
        retry_failed: also retry items whose image failed before.
        save_every_s: save both spaces' indexes at most this often (a cache only).
    """

    limit: int | None = None
    order: str | None = None
    runtime: str = "auto"
    threads: int | None = None
    batch_size: int = 32
    workers: int = 2
    commit_every: int = 256
    retry_failed: bool = False
    save_every_s: float = 120.0


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`~galleria.upgrade.train.train_transform`.

    Attributes:
        kind: ``regression`` (psi, no labels), ``metric-compatible`` (psi, labels)
            or ``bct`` (BCT head, labels).
        images: folder or CSV manifest of training images (embedded with both
            models; cached).
        from_job: use the (old, new) pairs the backfill collected instead.
        label_column: manifest column holding class labels.
        split_column, split: keep only manifest rows whose ``split_column`` is ``split``.
        out: where to save (default ``<gallery>/upgrade/transforms/<kind>``).
        params: hyper-parameters of the map (see ReverseTransform / BCTHead).
        runtime, threads, batch_size, workers: how the training images are embedded.
    """

    kind: str = "regression"
    images: str | os.PathLike[str] | None = None
    from_job: bool = False
    label_column: str | None = None
    split_column: str | None = None
    split: str | None = None
    out: str | os.PathLike[str] | None = None
    params: dict[str, Any] | None = None
    runtime: str = "auto"
    threads: int | None = None
    batch_size: int = 32
    workers: int = 2
