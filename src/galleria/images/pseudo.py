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

Crops alone flatter global descriptors: a real phone photo of an item also shows
what is around it. With ``scene=`` (:class:`Scene`, used by the tuner), a fraction
of the views place the item, as photographed, inside a larger frame over a
procedural clutter background ("dead leaves": random overlapping shapes, which
match no gallery item), so the item fills only part of the photo, as in a shop
or on a desk.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from galleria.errors import GalleriaError, InputError
from galleria.fingerprint import digest
from galleria.images.augment import PhoneAugment, jpeg, phone_view
from galleria.images.decode import load_image
from galleria.types import SearchResult

log = logging.getLogger(__name__)

PSEUDO_AUGMENT = PhoneAugment(min_area=0.35, perspective=0.12, rotate=12.0, brightness=0.4,
                              contrast=0.35, saturation=0.35, color_cast=0.08, blur=1.5,
                              jpeg=(30, 85), downscale=0.5)
"""The views pseudo-queries are made of: what a phone photo of a gallery item does."""


@dataclass(frozen=True)
class Scene:
    """How often and how large an item is placed in a cluttered frame (see the module
    docstring).

    Attributes:
        p: fraction of the views placed in a scene (the others are crops).
        area: ``(min, max)`` fraction of the frame the item covers.
        min_side: the frame's longer side is at least this (pixels): a phone photo is
            not smaller than the catalogue image it shows.
        shapes: shapes of the clutter background.
    """

    p: float = 0.5
    area: tuple[float, float] = (0.2, 0.6)
    min_side: int = 320
    shapes: int = 120

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["area"] = list(self.area)
        return d


TUNE_SCENE = Scene()
"""The scene placement the tuner uses."""


def clutter(size: tuple[int, int], rng: np.random.Generator, shapes: int = 120) -> Image.Image:
    """A ``size`` (w, h) dead-leaves background: random ellipses and rectangles, sizes
    from a power law, muted random colours, slightly blurred (natural-image-like
    clutter)."""
    w, h = size
    grey = float(rng.uniform(60, 200))

    def colour() -> tuple[int, int, int]:  # muted: mostly grey, some tint
        c = 0.6 * grey + 0.4 * rng.integers(0, 256, 3) + rng.normal(0, 20)
        return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]

    img = Image.new("RGB", (w, h), colour())
    draw = ImageDraw.Draw(img)
    side = max(w, h)
    for _ in range(int(shapes)):
        r = side * 0.02 / max(rng.random(), 0.02) ** 0.7  # power law: many small, few large
        r = float(min(r, side * 0.5))
        x, y = float(rng.uniform(-r, w + r)), float(rng.uniform(-r, h + r))
        ax, ay = r, r * float(rng.uniform(0.3, 1.0))
        box = (x - ax, y - ay, x + ax, y + ay)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour())
        else:
            draw.rectangle(box, fill=colour())
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))


def in_scene(item: Image.Image, rng: np.random.Generator, scene: Scene) -> Image.Image:
    """``item`` (a photographed view) placed at a random spot of a cluttered frame."""
    frac = float(rng.uniform(*scene.area))
    w, h = item.size
    fw, fh = w / np.sqrt(frac), h / np.sqrt(frac)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    fw, fh = max(fw, w * 1.05) * aspect ** 0.5, max(fh, h * 1.05) / aspect ** 0.5
    grow = max(1.0, scene.min_side / max(fw, fh))
    if grow > 1.0:  # keep the frame at a phone-photo size: enlarge the item with it
        item = item.resize((max(1, round(w * grow)), max(1, round(h * grow))),
                           Image.Resampling.BICUBIC)
        w, h = item.size
        fw, fh = fw * grow, fh * grow
    W, H = max(round(fw), w + 1), max(round(fh), h + 1)
    canvas = clutter((W, H), rng, scene.shapes)
    x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    canvas.paste(item, (x0, y0))
    return canvas

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
               augment: PhoneAugment = PSEUDO_AUGMENT,
               scene: Scene | None = None) -> PseudoQueries:
    """Pseudo-queries from ``(id, image)`` pairs: ``views`` views of each image.

    ``scene``: place a fraction of the views in a cluttered frame (:class:`Scene`);
    those are made without ``augment``'s downscale and JPEG, which apply to the whole
    frame instead.
    """
    ids: list[str] = []
    images: list[Image.Image] = []
    inner = replace(augment, downscale=1.0, jpeg=(100, 100))
    for v in range(views):
        for item_id, img in items:
            rng = view_rng(seed, v, item_id)
            ids.append(item_id)
            if scene is not None and rng.random() < scene.p:
                view = in_scene(phone_view(img, rng, inner, work_side=None), rng, scene)
                if rng.random() < 0.7:
                    view = jpeg(view, int(rng.integers(augment.jpeg[0], augment.jpeg[1] + 1)))
                images.append(view)
            else:
                images.append(phone_view(img, rng, augment, work_side=None))
    aug = augment.to_dict()
    if scene is not None:
        aug["scene"] = scene.to_dict()
    return PseudoQueries(ids, images, int(seed), aug)


def make_pseudo_queries(gallery: Any, *, n: int = 200, seed: int = 0, views: int = 1,
                        space: str | None = None,
                        augment: PhoneAugment = PSEUDO_AUGMENT,
                        scene: Scene | None = None) -> PseudoQueries:
    """Pseudo-queries of a seeded sample of ``gallery``'s items (their stored images).

    Args:
        gallery: a :class:`~galleria.store.gallery.Gallery`.
        n: how many items to sample (all when the gallery holds fewer).
        views: views per sampled item.
        space: sample only items with data in this space (default: every item).
        scene: place a fraction of the views in a cluttered frame (:class:`Scene`).

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
    pq = make_views(items, seed=seed, views=views, augment=augment, scene=scene)
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
