"""Attach fitted transforms to galleries: fit on a space's vectors, copy the
transform into the gallery, and (optionally) add the transformed space.

A gallery space built through a transform records it in its extractor config
(``{"type": "transformed", "base": {...}, "transform": "transforms/<name>", "dim": d}``);
the query path (:func:`galleria.extract.spaces.extractor_from_space`) then
applies the same transform automatically.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from galleria.fingerprint import slug
from galleria.store.gallery import Gallery

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


def fit_on_gallery(
    gallery: Gallery,
    kind: str,
    *,
    dim: int | None = None,
    space: str | None = None,
    sample: int | None = None,
    seed: int = 0,
    progress: Any = None,
    **params: Any,
) -> tuple[Any, dict[str, Any]]:
    """Fit a transform of ``kind`` on the vectors of ``space`` (no labels)."""
    import time

    from galleria.transforms.registry import create_transform

    info = gallery.space_info(space)
    _, x = gallery.load_vectors(info.space)
    if sample is not None and sample < len(x):
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
    tr = create_transform(kind, dim=dim, **params)
    t0 = time.perf_counter()
    tr.fit(x, fingerprint=info.space, progress=progress)
    stats = {"fit_seconds": round(time.perf_counter() - t0, 2), "fitted_on": len(x),
             "input_fingerprint": info.space, "output_fingerprint": tr.output_fingerprint}
    return tr, stats


def add_transformed_space(
    gallery: Gallery,
    transform: Any,
    transform_dir: str | Path,
    *,
    space: str | None = None,
    make_primary: bool = True,
    index: str | None = None,
    batch: int = 65536,
) -> str:
    """Add the transform's output space (all items) to the gallery; returns its fingerprint."""
    base = gallery.space_info(space)
    out_fp = transform.output_fingerprint
    rel = copy_into_gallery(gallery, transform_dir, out_fp)
    info = dict(base.info)
    if isinstance(info.get("config"), dict):
        info["config"] = {"type": "transformed", "base": info["config"], "transform": rel,
                          "dim": int(transform.output_dim_)}
    info.pop("query_config", None)
    info.update({"fingerprint": out_fp, "dim": int(transform.output_dim_),
                 "base_fingerprint": base.space,
                 "transform": {"kind": transform.kind, "params": transform.json_params()}})
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
    return out_fp
