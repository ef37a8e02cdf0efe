"""Training data of a fusion model: member features from a feature store, query-trunk views.

*Member features* live in a :class:`~galleria.store.gallery.Gallery` with one
space per member extractor (its fingerprint), filled resumably by
:func:`fill_features` (items already stored are skipped, so a killed run loses at
most one commit) and read back by :func:`load_features`. Only the gallery's public
API is used (``open_or_create``, ``register_space``, ``has``, ``add``, ``keys_of``,
``get_vectors``).

*Query views* are the frozen query trunk's outputs on ``n_views`` views of each
training image: view 0 is the clean image, views 1.. are phone-like
augmentations (:mod:`galleria.images.augment`), each fixed by ``(seed, view,
item id)``. They are cached as float16 arrays in parts of ``part_size`` images
(``part-00000.npy`` ..., written atomically; a rerun computes only missing parts)
under a folder named by a digest of everything that determines them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.extract.embed import Progress, embed_stream
from galleria.extractors.base import Extractor
from galleria.fingerprint import digest
from galleria.fusion.options import options_of
from galleria.images.augment import PhoneAugment, phone_view
from galleria.images.decode import load_image
from galleria.images.sources import SourceItem
from galleria.io.atomic import load_array, read_json, write_json, write_npy

log = logging.getLogger(__name__)

VIEWS_TYPE = "fusion-views"
VIEWS_VERSION = 1


# --------------------------------------------------------------------------- store
def space_info(ext: Extractor) -> dict[str, Any]:
    """What a member space records: the config that rebuilds the extractor."""
    info: dict[str, Any] = {"fingerprint": ext.fingerprint, "name": ext.name}
    with contextlib.suppress(NotImplementedError):
        info["config"] = ext.config()
    return info


def fill_features(
    gallery: Any,
    items: Sequence[SourceItem],
    extractors: Sequence[Extractor],
    *,
    batch_size: int = 32,
    workers: int = 2,
    flush_every: int = 256,
    progress: Progress | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Embed ``items`` with every extractor into its own space of ``gallery`` (resumable).

    Returns ``{space: [(item id, reason), ...]}`` of the images that failed.
    """
    failures: dict[str, list[tuple[str, str]]] = {}
    for ext in extractors:
        space = ext.fingerprint
        gallery.register_space(space, ext.dim, space_info(ext))
        done = gallery.has([it.id for it in items], space)
        todo = [it for it, d in zip(items, done, strict=True) if not d]
        if progress is not None and done.any():
            progress.update(int(done.sum()))
        log.info("%s: %d of %d images to embed", space, len(todo), len(items))
        buf: list[tuple[SourceItem, np.ndarray]] = []
        fails = failures.setdefault(space, [])
        for batch in embed_stream(todo, ext, batch_size=batch_size, workers=workers,
                                  progress=progress):
            buf.extend(zip(batch.items, batch.vectors, strict=True))
            fails.extend((it.id, why) for it, why in batch.failures)
            if len(buf) >= flush_every:
                _flush(gallery, space, buf)
        _flush(gallery, space, buf)
    return failures


def _flush(gallery: Any, space: str, buf: list[tuple[SourceItem, np.ndarray]]) -> None:
    if buf:
        gallery.add([it.id for it, _ in buf], np.stack([v for _, v in buf]), space=space,
                    meta=[{"path": str(it.path)} for it, _ in buf])
        buf.clear()


def load_features(gallery: Any, ids: Sequence[str], spaces: Sequence[str]) -> list[np.ndarray]:
    """``(N, D_i)`` float32 features of ``ids`` in each space (error if one is missing)."""
    keys = gallery.keys_of(list(ids))
    if (keys < 0).any():
        missing = [i for i, k in zip(ids, keys, strict=True) if k < 0][:5]
        raise InputError(f"{int((keys < 0).sum())} ids are not in the feature store: {missing}")
    return [np.asarray(gallery.get_vectors(keys, space=s), np.float32) for s in spaces]


# --------------------------------------------------------------------------- labels
def encode(labels: Sequence[Any]) -> np.ndarray:
    """Labels of any comparable type -> ``(N,)`` int64 codes ``0 .. n_classes-1``."""
    return np.unique(np.asarray(labels).astype(str), return_inverse=True)[1].astype(np.int64)


def manifest_labels(items: Sequence[SourceItem], column: str | None) -> np.ndarray:
    """``(N,)`` int64 labels from a manifest column, or one class per image (``None``)."""
    if column is None:
        return np.arange(len(items), dtype=np.int64)
    missing = [it.id for it in items if not it.meta.get(column)]
    if missing:
        raise InputError(
            f"{len(missing)} manifest rows have no {column!r} value (e.g. {missing[:3]}); "
            f"columns present: {sorted(items[0].meta) if items else []}"
        )
    return encode([it.meta[column] for it in items])


# --------------------------------------------------------------------------- views
def _views_of(item: SourceItem, prep: Any, n_views: int, aug: PhoneAugment, seed: int
              ) -> np.ndarray:
    img = load_image(item.path, bbox=item.bbox)
    out = [prep(img)]
    h = zlib.crc32(item.id.encode())
    for v in range(1, n_views):
        rng = np.random.default_rng([seed, v, h])
        out.append(prep(phone_view(img, rng, aug)))
    return np.stack(out)


def views_key(items: Sequence[SourceItem], trunk_id: str, n_views: int, aug: PhoneAugment,
              seed: int) -> str:
    return digest(VIEWS_TYPE, VIEWS_VERSION, trunk_id, n_views, aug.to_dict(), seed,
                  [(it.id, str(it.path), it.bbox) for it in items])


@dataclass(frozen=True)
class ViewsConfig:
    """How :func:`compute_views` makes and stores the views.

    Attributes:
        n_views: views per image (view 0 is the clean image).
        augment: the phone-like augmentation (``None``: :class:`PhoneAugment` defaults).
        seed: the views' seed (with the image's id).
        part_size: images per cached part (a kill loses at most one part).
        batch: images x views per trunk call.
        workers: image decoding threads.
    """

    n_views: int = 1
    augment: PhoneAugment | None = None
    seed: int = 0
    part_size: int = 128
    batch: int = 16
    workers: int = 2


def compute_views(
    items: Sequence[SourceItem],
    trunk: Any,
    preprocessing: Any,
    folder: str | os.PathLike[str],
    *,
    trunk_id: str,
    config: ViewsConfig | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> np.ndarray:
    """``(N, n_views, *trunk_out)`` float16 trunk outputs of every item's views (cached).

    Args:
        trunk: ``fn((B, 3, H, W) float32) -> (B, ...)``, the frozen trunk (e.g.
            :func:`galleria.fusion.query_model.trunk_runner`).
        preprocessing: the query model's :class:`~galleria.extractors.preprocessing.Preprocessing`.
        folder: cache root; a sub-folder named by the cache key holds the parts.
        trunk_id: identity of the trunk (weights id + split), part of the key.
        config: a :class:`ViewsConfig`; or give its fields as keywords (``n_views=3``).
    """
    cfg = options_of(ViewsConfig, config, options)
    n_views, augment, seed = cfg.n_views, cfg.augment, cfg.seed
    part_size, batch, workers = cfg.part_size, cfg.batch, cfg.workers
    if n_views < 1:
        raise InputError(f"n_views must be >= 1, got {n_views}")
    if not items:
        raise InputError("no images to compute views of")
    aug = augment or PhoneAugment()
    key = views_key(items, trunk_id, n_views, aug, seed)
    root = Path(folder) / f"views-{key}"
    root.mkdir(parents=True, exist_ok=True)
    header = root / "header.json"
    if not header.is_file():
        write_json(header, {"type": VIEWS_TYPE, "format_version": VIEWS_VERSION,
                            "trunk": trunk_id, "n_views": n_views, "augment": aug.to_dict(),
                            "seed": seed, "n": len(items), "part_size": part_size})
    elif read_json(header).get("part_size") != part_size:
        raise InputError(f"{root} was written with another part size")
    parts = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="views") as pool:
        for p, start in enumerate(range(0, len(items), part_size)):
            f = root / f"part-{p:05d}.npy"
            chunk = items[start:start + part_size]
            if f.is_file():
                arr = load_array(f)
                if arr.shape[0] == len(chunk) and arr.shape[1] == n_views:
                    parts.append(arr)
                    if progress is not None:
                        progress.update(len(chunk))
                    continue
            step = max(1, batch // n_views)
            outs = []
            for s in range(0, len(chunk), step):
                sub = chunk[s:s + step]
                views = list(pool.map(
                    lambda it: _views_of(it, preprocessing, n_views, aug, seed), sub))
                y = np.asarray(trunk(np.concatenate(views))).astype(np.float16)
                outs.append(y.reshape(len(sub), n_views, *y.shape[1:]))
                if progress is not None:
                    progress.update(len(sub))
            arr = np.concatenate(outs)
            write_npy(f, arr)
            parts.append(arr)
    return np.concatenate(parts)
