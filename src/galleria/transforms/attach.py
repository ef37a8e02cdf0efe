"""Attach fitted transforms to galleries: fit on a space's vectors, copy the
transform into the gallery, and (optionally) add the transformed space.

A gallery space built through a transform records it in its extractor config
(``{"type": "transformed", "base": {...}, "transform": "transforms/<name>", "dim": d}``)
and ``info["base_space"]``; the query path
(:func:`galleria.extract.spaces.extractor_from_space`) then applies the same
transform automatically.

Transforms never stack by accident. The query path rebuilds *one* transform on
top of the model, so:

- fitting with no space named fits on the model's own space (the *root* of the
  primary space, if the primary is itself a transform output); fitting on a
  transformed space takes ``stack=True`` and cannot be applied;
- applying a transform to a gallery that already has a transformed space of the
  same base is refused unless ``replace=True``, which drops the previous one(s)
  once the new space is complete.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.fingerprint import slug
from galleria.store.gallery import Gallery
from galleria.transforms.registry import create_transform

log = logging.getLogger(__name__)


def copy_into_gallery(gallery: Gallery, transform_dir: str | Path, output_fingerprint: str) -> str:
    """Copy a saved transform into ``<gallery>/transforms/``; returns its relative path."""
    rel = Path("transforms") / slug(output_fingerprint)
    dest = gallery.path / rel
    if not dest.exists():
        tmp = gallery.path / "transforms" / f".tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(transform_dir, tmp)
        tmp.rename(dest)
    return rel.as_posix()


def base_space(info: dict[str, Any]) -> str | None:
    """The space a transformed space was computed from; None for a model's own space."""
    base = info.get("base_space") or info.get("base_fingerprint")
    return str(base) if base else None


def root_space(gallery: Gallery, space: str) -> str:
    """The model's own space under ``space`` (following transform bases; ``space`` if none).

    A base that the gallery does not hold (a gallery indexed through a transform)
    ends the walk: the root is then the outermost space the gallery has.
    """
    infos = {s.space: s.info for s in gallery.spaces()}
    seen = {space}
    while True:
        base = base_space(infos.get(space, {}))
        if base is None or base not in infos or base in seen:
            return space
        seen.add(base)
        space = base


def derived_spaces(gallery: Gallery, root: str) -> list[str]:
    """The transformed spaces of the gallery whose root is ``root``."""
    return [s.space for s in gallery.spaces()
            if s.space != root and base_space(s.info) is not None
            and root_space(gallery, s.space) == root]


def fit_space(gallery: Gallery, space: str | None = None, *, stack: bool = False) -> str:
    """The space a transform should be fitted on (see the module docstring).

    Raises:
        InputError: ``space`` is a transform output and ``stack`` is False.
    """
    info = gallery.space_info(space)
    base = base_space(info.info)
    if base is None:
        return info.space
    if space is None and not stack:
        root = root_space(gallery, info.space)
        log.info("the primary space %s is a transform output; fitting on its base %s",
                 info.space, root)
        return root
    if not stack:
        raise InputError(
            f"space {info.space!r} is the output of a transform (of {base!r}); fitting on it "
            f"would stack a second transform. Fit on the model's space (--space "
            f"{root_space(gallery, info.space)!r}, the default), or pass --stack "
            "(stack=True) to fit on the transformed vectors deliberately"
        )
    return info.space


def fit_on_gallery(
    gallery: Gallery,
    kind: str,
    *,
    dim: int | None = None,
    space: str | None = None,
    stack: bool = False,
    sample: int | None = None,
    seed: int = 0,
    progress: Any = None,
    **params: Any,
) -> tuple[Any, dict[str, Any]]:
    """Fit a transform of ``kind`` on the vectors of a space (no labels).

    ``space``: None fits on the model's own space (the root of the primary
    space); a transformed space needs ``stack=True`` (:func:`fit_space`).
    """

    fitted = fit_space(gallery, space, stack=stack)
    _, x = gallery.load_vectors(fitted)
    if sample is not None and sample < len(x):
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
    tr = create_transform(kind, dim=dim, **params)
    t0 = time.perf_counter()
    tr.fit(x, fingerprint=fitted, progress=progress)
    stats = {"fit_seconds": round(time.perf_counter() - t0, 2), "fitted_on": len(x),
             "input_fingerprint": fitted, "output_fingerprint": tr.output_fingerprint}
    return tr, stats


def check_can_apply(gallery: Gallery, base: str, *, replace: bool = False,
                    output_fingerprint: str | None = None) -> list[str]:
    """The transformed spaces of ``base`` an apply would replace (empty if none).

    Raises:
        InputError: ``base`` is itself a transform output (applying would stack),
            or the gallery already has a transformed space of ``base`` (other than
            ``output_fingerprint``) and ``replace`` is False.
    """
    info = gallery.space_info(base)
    if base_space(info.info) is not None:
        raise InputError(
            f"space {base!r} is a transform output: a transform fitted on it cannot be "
            "applied (queries are rebuilt through one transform on top of the model); fit on "
            f"{root_space(gallery, base)!r} instead, or save the stacked transform without "
            "applying it"
        )
    existing = [s for s in derived_spaces(gallery, base) if s != output_fingerprint]
    if existing and not replace:
        raise InputError(
            f"gallery {gallery.path} already has a transformed space of {base!r}: "
            f"{', '.join(repr(s) for s in existing)}. Applying another would keep both; pass "
            "--replace (replace=True) to replace it with the new transform, or fit without "
            "--apply to only save the new one"
        )
    return existing


def add_transformed_space(
    gallery: Gallery,
    transform: Any,
    transform_dir: str | Path,
    *,
    space: str | None = None,
    make_primary: bool = True,
    index: str | None = None,
    replace: bool = False,
    batch: int = 65536,
) -> str:
    """Add the transform's output space (all items) to the gallery; returns its fingerprint.

    ``space``: the model's space the transform was fitted on (default: the root
    of the primary space). Re-applying the same transform completes its space
    (nothing is stacked); another transform of the same base needs ``replace``,
    which drops the previous transformed space(s) once the new one is complete
    (:func:`check_can_apply`).
    """
    base = gallery.space_info(space if space is not None else fit_space(gallery))
    out_fp = transform.output_fingerprint
    old = check_can_apply(gallery, base.space, replace=replace, output_fingerprint=out_fp)
    rel = copy_into_gallery(gallery, transform_dir, out_fp)
    info = dict(base.info)
    if isinstance(info.get("config"), dict):
        info["config"] = {"type": "transformed", "base": info["config"], "transform": rel,
                          "dim": int(transform.output_dim_)}
    info.pop("query_config", None)
    info.update({"fingerprint": out_fp, "dim": int(transform.output_dim_),
                 "base_space": base.space,
                 "transform": {"kind": transform.kind, "params": transform.json_params(),
                               "folder": rel}})
    done = set(gallery.ids(out_fp)) if any(s.space == out_fp for s in gallery.spaces()) else set()
    for keys, vecs in gallery.iter_vectors(base.space, batch=batch):
        ids = [str(i) for i in gallery.ids_of(keys)]
        todo = [n for n, i in enumerate(ids) if i not in done]
        if not todo:
            continue
        y = transform.transform(vecs[todo], fingerprint=base.space)
        gallery.add([ids[n] for n in todo], y, space=out_fp, info=info)
    if index is not None:
        gallery.set_index_spec(index, out_fp)
    gallery.save_index(out_fp)
    if make_primary:
        gallery.set_primary_space(out_fp)
    for s in old:
        _drop_transformed_space(gallery, s)
    return out_fp


def _drop_transformed_space(gallery: Gallery, space: str) -> None:
    """Drop a replaced transformed space and its copied transform (if nothing else uses it)."""
    rel = _transform_of(gallery.space_info(space).info)
    n = gallery.drop_space(space, force=True)
    log.info("replaced: dropped space %s (%d vectors)", space, n)
    if not rel:
        return
    still_used = any(_transform_of(s.info) == rel for s in gallery.spaces())
    folder = gallery.path / str(rel)
    if not still_used and folder.parent == gallery.path / "transforms":
        shutil.rmtree(folder, ignore_errors=True)


def _transform_of(info: dict[str, Any]) -> str | None:
    """The copied transform folder a space's extractor config applies (if any)."""
    cfg = info.get("config")
    if isinstance(cfg, dict) and cfg.get("type") == "transformed":
        return str(cfg.get("transform"))
    folder = (info.get("transform") or {}).get("folder")
    return str(folder) if folder else None
