"""Self-supervised pseudo-queries: phone-like views of a seeded sample of a gallery's
own images, with no labels.

A pseudo-query is a view of one gallery image (crop, perspective, rotation,
light, blur, downscale, JPEG: :func:`galleria.images.augment.phone_view`); its one
known answer is the item it was made from. Every choice galleria makes for a
gallery nobody labelled (the default pipeline and its parameters, the score
calibration, an online backfill map, the fusion query adaptation) is scored on
the same pseudo-queries::

    pq = make_pseudo_queries(gallery, n=200, seed=0)   # PseudoQueries
    result = searcher.search(searcher.embed_images(pq.images), k=10)
    pseudo_scores(result, pq.ids)                      # {"r1": .., "r10": .., "mrr": .., "n": ..}

The sample and every view are fixed by ``seed`` (a view by ``(seed, view, item
id)``), so a choice made on them is deterministic.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from galleria.errors import GalleriaError, InputError
from galleria.fingerprint import digest
from galleria.images.augment import PhoneAugment, phone_view
from galleria.images.decode import load_image
from galleria.types import SearchResult

log = logging.getLogger(__name__)

PSEUDO_AUGMENT = PhoneAugment(min_area=0.35, perspective=0.12, rotate=12.0, brightness=0.4,
                              contrast=0.35, saturation=0.35, color_cast=0.08, blur=1.5,
                              jpeg=(30, 85), downscale=0.5)
"""The views pseudo-queries are made of: what a phone photo of a gallery item does."""


@dataclass(frozen=True)
class PseudoQueries:
    """Views of gallery items and the item each was made from.

    Attributes:
        ids: ``(P,)`` the source item id of each view (its one true answer).
        images: ``(P,)`` the views (RGB).
        seed: the seed of the sample and of the views.
        augment: the :class:`PhoneAugment` parameters.
        skipped: ``[(id, reason)]`` sampled items whose image could not be read.
    """

    ids: list[str]
    images: list[Image.Image]
    seed: int
    augment: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        """Identifies the set (sample, seed, augmentation): a cache key for its embeddings."""
        return digest("pseudo-queries", self.ids, self.seed, self.augment)


def sample_ids(ids: Sequence[str], n: int, *, seed: int) -> list[str]:
    """A seeded sample of ``n`` ids (all when fewer), independent of the input order."""
    if n <= 0:
        raise InputError(f"the number of pseudo-queries must be positive, got {n}")
    pool = sorted(set(ids))
    if len(pool) <= n:
        return pool
    pick = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(pick)]


def view_rng(seed: int, view: int, item_id: str) -> np.random.Generator:
    """The generator of one view: fixed by ``(seed, view, item id)``."""
    return np.random.default_rng([int(seed), int(view), zlib.crc32(item_id.encode())])


def make_views(items: Sequence[tuple[str, Image.Image]], *, seed: int = 0, views: int = 1,
               augment: PhoneAugment = PSEUDO_AUGMENT) -> PseudoQueries:
    """Pseudo-queries from ``(id, image)`` pairs: ``views`` views of each image."""
    ids: list[str] = []
    images: list[Image.Image] = []
    for v in range(views):
        for item_id, img in items:
            ids.append(item_id)
            images.append(phone_view(img, view_rng(seed, v, item_id), augment, work_side=None))
    return PseudoQueries(ids, images, int(seed), augment.to_dict())


def make_pseudo_queries(gallery: Any, *, n: int = 200, seed: int = 0, views: int = 1,
                        space: str | None = None,
                        augment: PhoneAugment = PSEUDO_AUGMENT) -> PseudoQueries:
    """Pseudo-queries of a seeded sample of ``gallery``'s items (their stored images).

    Args:
        gallery: a :class:`~galleria.store.gallery.Gallery`.
        n: how many items to sample (all when the gallery holds fewer).
        views: views per sampled item.
        space: sample only items with data in this space (default: every item).

    Items whose image cannot be read (moved, deleted, no path) are skipped and
    listed in ``skipped``; the sample is drawn from the ids, so it does not
    depend on which files are readable.
    """
    chosen = sample_ids(gallery.ids(space), n, seed=seed)
    items: list[tuple[str, Image.Image]] = []
    skipped: list[tuple[str, str]] = []
    for item_id, meta in zip(chosen, gallery.meta(chosen), strict=True):
        path = (meta or {}).get("path")
        if not path:
            skipped.append((item_id, "no stored image path"))
            continue
        try:
            items.append((item_id, load_image(path)))
        except (GalleriaError, OSError) as exc:
            skipped.append((item_id, str(exc)))
    if skipped:
        log.warning("%d of %d sampled items have no readable image (first: %s)",
                    len(skipped), len(chosen), skipped[0])
    if not items:
        raise InputError(f"none of the {len(chosen)} sampled items of {gallery.path} has a "
                         "readable image: pseudo-queries need the gallery's images")
    pq = make_views(items, seed=seed, views=views, augment=augment)
    return PseudoQueries(pq.ids, pq.images, pq.seed, pq.augment, skipped)


def rank_of_truth(result: SearchResult, truth: Sequence[str]) -> np.ndarray:
    """``(P,)`` 0-based rank of each query's true item in its result row; -1 when absent."""
    if len(result) != len(truth):
        raise InputError(f"{len(result)} result rows for {len(truth)} pseudo-queries")
    hit = result.ids == np.asarray(list(truth), dtype=object)[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def pseudo_scores(result: SearchResult, truth: Sequence[str]) -> dict[str, float]:
    """Recall@1, Recall@10 (of the result's depth) and MRR of the true items, in %."""
    r = rank_of_truth(result, truth)
    found = r >= 0
    return {
        "n": float(len(r)),
        "r1": 100.0 * float(np.mean(r == 0)) if len(r) else 0.0,
        "r10": 100.0 * float(np.mean(found & (r < 10))) if len(r) else 0.0,
        "mrr": 100.0 * float(np.mean(np.where(found, 1.0 / np.maximum(r + 1.0, 1.0), 0.0)))
        if len(r) else 0.0,
    }
