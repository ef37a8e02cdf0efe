"""Live change of any feature through the upgrade job: a new transform, local
features added to a global gallery, a fused model.

Every change is one job with the same steps (``start`` / ``run`` / ``status`` /
``finish``), the same guarantees (resumable, kill -9 safe, served meanwhile)
and the same end: the gallery a fresh index with the new features would be.

``start_transform(G, T)`` (change ``transform``)
    The new space is ``T(base)``, ``base`` the model's own space under the
    primary one. ``run`` computes it from the stored base vectors (no image is
    read, no model runs) and *adds* it beside the old primary space; search
    merges the old primary space (items not yet transformed) with the new one
    (items done), both queries from one forward pass of the model. ``finish``
    makes it primary and drops the old primary when it was itself a transform
    (the base stays, as ``galleria transform fit --apply --replace`` leaves it).
``start_local(G, "sift")`` (change ``local``)
    The new space holds local features; ``run`` extracts them and adds them
    beside the global space (which stays complete). Search merges the global
    answers for items without local features with the local (ASMK) answers for
    items with them (:mod:`galleria.upgrade.local_search`), so it is the global
    search at 0 % and the local pipeline at 100 %; ``auto`` search serves it only
    once the job's pseudo-query check finds it better than the global answers
    (:mod:`galleria.upgrade.local_guard`), the global answers until then.
    ``finish`` builds the local index from all items (as ``galleria index
    --local`` does at its end); the gallery's default search is then the local
    pipeline, as for a fresh index.
    Until then the local space is *pending* (:func:`pending_space`): the
    default pipeline decision must not search a half-filled local space.
``start_fusion(G, F)`` (change ``model``)
    A fused model is a new global model (its light query model recorded as
    the space's query model): an ordinary model upgrade.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from galleria.errors import InputError
from galleria.extract.spaces import space_info
from galleria.extractors.base import Extractor
from galleria.extractors.registry import create_extractor
from galleria.store.gallery import Gallery
from galleria.transforms.attach import check_can_apply, copy_into_gallery, fit_space
from galleria.transforms.registry import load_transform
from galleria.upgrade.job import check_can_start, start_upgrade
from galleria.upgrade.local_guard import GUARD_KEY, LocalGuardConfig
from galleria.upgrade.online import OnlineConfig
from galleria.upgrade.state import (
    PROGRESS_KEY,
    STATE_KEY,
    UpgradeError,
    UpgradeState,
    job_folder,
    save_state,
)

log = logging.getLogger(__name__)


def _record_job(gallery: Gallery, state: UpgradeState) -> UpgradeState:
    save_state(gallery, state)
    gallery.set_setting(PROGRESS_KEY, {"runs": []})
    job_folder(gallery).mkdir(parents=True, exist_ok=True)
    log.info("%s change %s -> %s started", state.change, state.old_space, state.new_space)
    return state


# --------------------------------------------------------------------------- #
# transform
# --------------------------------------------------------------------------- #


def start_transform(
    gallery_path: str | os.PathLike[str],
    transform_dir: str | os.PathLike[str],
    *,
    order: str = "queries",
    seed: int = 0,
    calib_size: int = 1000,
) -> UpgradeState:
    """Start applying a fitted transform (a folder saved by ``galleria transform fit``).

    The transform must have been fitted on the model's own space under the
    gallery's primary space (its fingerprint is checked). Another transformed
    space of that model is replaced at ``finish``.

    Raises:
        UpgradeError: a job is in progress, or the gallery already searches that space.
        CompatibilityError: the transform was fitted on another model's embeddings.
    """

    with Gallery.open(gallery_path) as gallery:
        check_can_start(gallery)
        old = gallery.primary_space
        if old is None:
            raise UpgradeError(f"gallery {gallery.path} is empty: nothing to change")
        base = gallery.space_info(fit_space(gallery))
        tr = load_transform(transform_dir, fingerprint=base.space)
        out_fp = tr.output_fingerprint
        if out_fp == old:
            raise UpgradeError(f"gallery {gallery.path} already searches {out_fp!r}")
        check_can_apply(gallery, base.space, replace=True, output_fingerprint=out_fp)
        if gallery.has_space(out_fp) and gallery.count(out_fp):
            raise UpgradeError(f"space {out_fp!r} already holds vectors; drop it first")
        rel = copy_into_gallery(gallery, transform_dir, out_fp)
        info = transformed_space_info(base.info, tr, rel, base.space)
        gallery.register_space(out_fp, int(tr.output_dim_), info)
        state = UpgradeState(
            old_space=old, new_space=out_fp, new_model=f"transform:{tr.kind}", mode="online",
            order=order, seed=int(seed), calib_size=int(calib_size), started=time.time(),
            online={"config": OnlineConfig(enabled=False).to_dict()}, change="transform",
            extra={"base_space": base.space, "drop_old": old != base.space,
                   "transform": rel},
        )
        return _record_job(gallery, state)


def transformed_space_info(base_info: dict[str, Any], transform: Any, rel: str,
                           base_space: str) -> dict[str, Any]:
    """The record of a transformed space (as ``transforms.attach.add_transformed_space``)."""
    info = dict(base_info)
    if isinstance(info.get("config"), dict):
        info["config"] = {"type": "transformed", "base": info["config"], "transform": rel,
                          "dim": int(transform.output_dim_)}
    info.pop("query_config", None)
    info.update({"fingerprint": transform.output_fingerprint,
                 "dim": int(transform.output_dim_), "base_space": base_space,
                 "transform": {"kind": transform.kind, "params": transform.json_params(),
                               "folder": rel}})
    return info


# --------------------------------------------------------------------------- #
# local features
# --------------------------------------------------------------------------- #


def start_local(
    gallery_path: str | os.PathLike[str],
    local: str = "sift",
    *,
    extractor: Extractor | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    order: str = "queries",
    seed: int = 0,
    calib_size: int = 1000,
    guard: LocalGuardConfig | None = None,
) -> UpgradeState:
    """Start adding local features (``sift``, ``xfeat``) to a global gallery.

    ``guard``: the old-answers guard (:mod:`galleria.upgrade.local_guard`; default:
    200 pseudo-queries seeded by ``seed``, the global answers until the merged ones
    beat them, a check every 5 % of the gallery).

    Raises:
        UpgradeError: a job is in progress, the gallery is empty, or it already
            holds local features of that extractor.
    """
    with Gallery.open(gallery_path) as gallery:
        check_can_start(gallery)
        old = gallery.primary_space
        if old is None:
            raise UpgradeError(f"gallery {gallery.path} is empty: nothing to change")
        ext = extractor or create_extractor(local, runtime=runtime, threads=threads)
        if ext.kind != "local":
            raise InputError(f"{local!r} is not a local-feature extractor (sift, xfeat)")
        if gallery.has_space(ext.fingerprint) and gallery.count(ext.fingerprint):
            raise UpgradeError(f"gallery {gallery.path} already holds local features "
                               f"{ext.fingerprint!r}")
        gallery.register_space(ext.fingerprint, ext.dim, space_info(ext), kind="local")
        state = UpgradeState(
            old_space=old, new_space=ext.fingerprint, new_model=local, mode="online",
            order=order, seed=int(seed), calib_size=int(calib_size), started=time.time(),
            online={"config": OnlineConfig(enabled=False).to_dict(),
                    GUARD_KEY: (guard or LocalGuardConfig(seed=int(seed))).to_dict()},
            change="local",
            extra={"drop_old": False, "primary": old},
        )
        return _record_job(gallery, state)


# --------------------------------------------------------------------------- #
# fused model
# --------------------------------------------------------------------------- #


def start_fusion(
    gallery_path: str | os.PathLike[str],
    fusion_dir: str | os.PathLike[str],
    *,
    runtime: str = "auto",
    threads: int | None = None,
    **options: Any,
) -> UpgradeState:
    """Start switching the gallery to a fused model (a ``galleria fusion train`` folder).

    The model is copied into the gallery (as ``galleria index --fusion`` does);
    ``options`` go to :func:`~galleria.upgrade.job.start_upgrade`.
    """
    from galleria.fusion.extractor import gallery_extractor  # lazy: torch

    with Gallery.open(gallery_path) as gallery:
        check_can_start(gallery)
        if gallery.get_setting(STATE_KEY):
            raise UpgradeError("an upgrade is already in progress")
    ext = gallery_extractor(fusion_dir, gallery_path, runtime=runtime, threads=threads)
    return start_upgrade(gallery_path, "fusion", extractor=ext, **options)
