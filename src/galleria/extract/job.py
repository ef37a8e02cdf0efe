"""``galleria index``: embed a folder or manifest into a gallery, resumably.

Each flush writes a vector array and commits it with its item rows in one
SQLite transaction, so after ``kill -9`` the same call skips what is stored
and embeds the rest: every image ends up exactly once. Unusable images are
recorded as failures (with the reason) and skipped; they are retried on the
next run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.extract.embed import Progress, embed_stream
from galleria.extractors.base import Extractor
from galleria.extractors.registry import create_extractor
from galleria.images.sources import SourceItem, list_source
from galleria.io.atomic import write_json
from galleria.store.gallery import Failure, Gallery

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What one run of :func:`index_images` did."""

    gallery: str
    space: str
    total: int
    already_done: int
    embedded: int
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery,
            "space": self.space,
            "total": self.total,
            "already_done": self.already_done,
            "embedded": self.embedded,
            "failed": len(self.failures),
            "failures": [f.to_dict() for f in self.failures],
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
        }


def _meta(item: SourceItem) -> dict[str, Any]:
    """What an item records: its image path (absolute), crop box and manifest columns."""
    meta: dict[str, Any] = {"path": str(item.path.resolve()), **item.meta}
    if item.bbox is not None:
        meta["bbox"] = list(item.bbox)
    return meta


def recipe(extractor: Extractor, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a space records so the same extractor can be rebuilt for queries."""
    info = extractor.info().to_dict()
    opts = {k: v for k, v in options.items() if k not in ("runtime", "threads") and v is not None}
    info["recipe"] = {"model": name, **opts}
    return info


def extractor_from_space(
    info: dict[str, Any],
    *,
    root: str | os.PathLike[str] | None = None,
    runtime: str = "auto",
    threads: int | None = None,
) -> Extractor:
    """Rebuild the extractor (and transform) recorded by :func:`recipe`; check the fingerprint.

    ``root``: the gallery folder, against which a recorded transform path resolves.
    """
    from galleria.errors import CompatibilityError, FormatError

    rec = dict(info.get("recipe") or {})
    if "model" not in rec:
        raise FormatError("this space records no model recipe; pass query vectors instead")
    name = rec.pop("model")
    tr_path = rec.pop("transform", None)
    tr_dim = rec.pop("transform_dim", None)
    rec.pop("base_fingerprint", None)
    if "scales" in rec:
        rec["scales"] = tuple(rec["scales"])
    ext = create_extractor(name, runtime=runtime, threads=threads, **rec)
    if tr_path is not None:
        from galleria.extractors.transformed import TransformedExtractor
        from galleria.transforms.registry import load_transform

        path = Path(root or ".") / tr_path
        ext = TransformedExtractor(ext, load_transform(path, fingerprint=ext.fingerprint),
                                   dim=tr_dim)
    if info.get("fingerprint") and ext.fingerprint != info["fingerprint"]:
        raise CompatibilityError(
            f"the installed model {name!r} has fingerprint {ext.fingerprint!r} but the "
            f"gallery was built with {info['fingerprint']!r} (different weights or settings)"
        )
    return ext


def index_images(
    src: str | os.PathLike[str] | Sequence[SourceItem],
    out: str | os.PathLike[str],
    *,
    model: str = "effnet-lite0",
    extractor: Extractor | None = None,
    transform: str | os.PathLike[str] | None = None,
    pooling: str | None = None,
    scales: Sequence[float] = (1.0,),
    checkpoint: str | None = None,
    size: int | None = None,
    resize: str | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    index: str | None = None,
    index_params: dict[str, Any] | None = None,
    batch_size: int = 32,
    workers: int = 2,
    flush_every: int = 512,
    limit: int | None = None,
    progress: Progress | None = None,
) -> IndexReport:
    """Embed every image of ``src`` (a folder, a ``.csv`` manifest or items) into ``out``.

    Args:
        src: folder (ids = relative paths), manifest, or a list of SourceItem.
        out: gallery folder (created if needed; resumed if it exists).
        model: registry name (see ``galleria models``); or pass ``extractor``.
        transform: a saved transform (``galleria fit-transform``) applied to every
            embedding; it is copied into the gallery and applied to queries too.
        index: ``exact`` or a FAISS factory string for the space's index.
        flush_every: vectors buffered before a commit (the most work a crash loses).
        limit: stop after this many new images (for tests and trial runs).
        progress: object with ``update(n)`` called per image processed.

    Returns:
        IndexReport with counts, failures (id, path, reason) and throughput.
    """
    t0 = time.perf_counter()
    items = list(src) if not isinstance(src, (str, os.PathLike)) else list_source(src)
    options: dict[str, Any] = {"pooling": pooling, "scales": list(scales),
                               "checkpoint": checkpoint, "size": size, "resize": resize}
    if extractor is None:
        extra = {k: v for k, v in (("size", size), ("resize", resize)) if v is not None}
        extractor = create_extractor(
            model, pooling=pooling, scales=scales, checkpoint=checkpoint,
            runtime=runtime, threads=threads, **extra,
        )
        name = model
    else:
        name = extractor.name
    gallery = Gallery.open_or_create(out)
    try:
        return _index_into(
            gallery, items, extractor, name=name, options=options, transform=transform,
            index=index, index_params=index_params, batch_size=batch_size, workers=workers,
            flush_every=flush_every, limit=limit, progress=progress, t0=t0,
        )
    finally:
        gallery.close()


def _index_into(
    gallery: Gallery,
    items: list[SourceItem],
    extractor: Extractor,
    *,
    name: str,
    options: dict[str, Any],
    transform: str | os.PathLike[str] | None,
    index: str | None,
    index_params: dict[str, Any] | None,
    batch_size: int,
    workers: int,
    flush_every: int,
    limit: int | None,
    progress: Progress | None,
    t0: float,
) -> IndexReport:
    info = None
    if transform is not None:
        from galleria.extractors.transformed import TransformedExtractor
        from galleria.transforms.attach import copy_into_gallery
        from galleria.transforms.registry import load_transform

        tr = load_transform(transform, fingerprint=extractor.fingerprint)
        base_fp = extractor.fingerprint
        extractor = TransformedExtractor(extractor, tr)
        info = recipe(extractor, name, options)
        info["recipe"].update({
            "transform": copy_into_gallery(gallery, transform, extractor.fingerprint),
            "transform_dim": extractor.dim, "base_fingerprint": base_fp})
    space = extractor.fingerprint
    gallery.register_space(space, extractor.dim, info or recipe(extractor, name, options))
    if index is not None:
        if gallery.count(space) and index != gallery.index_spec(space):
            log.info("changing the index of %s to %s", space, index)
        if index != gallery.index_spec(space) or index_params:
            gallery.set_index_spec(index, space, **(index_params or {}))
    done = gallery.has([it.id for it in items], space)
    todo = [it for it, d in zip(items, done, strict=True) if not d]
    if limit is not None:
        todo = todo[: max(0, limit)]
    if progress is not None and done.any():
        progress.update(int(done.sum()))
    report = IndexReport(
        gallery=str(gallery.path), space=space, total=len(items),
        already_done=int(done.sum()), embedded=0,
    )
    buf_items: list[SourceItem] = []
    buf_vecs: list[np.ndarray] = []
    fails: list[Failure] = []

    def flush() -> None:
        if buf_items:
            gallery.add(
                [it.id for it in buf_items],
                np.concatenate(buf_vecs),
                space=space,
                meta=[_meta(it) for it in buf_items],
            )
            report.embedded += len(buf_items)
            buf_items.clear()
            buf_vecs.clear()
        if fails:
            gallery.record_failures(space, fails)
            report.failures.extend(fails)
            fails.clear()

    for batch in embed_stream(
        todo, extractor, batch_size=batch_size, workers=workers, progress=progress
    ):
        buf_items.extend(batch.items)
        buf_vecs.append(batch.vectors)
        fails.extend(Failure(it.id, str(it.path), why) for it, why in batch.failures)
        for it, why in batch.failures:
            log.warning("skipped %s: %s", it.path, why)
        if len(buf_items) >= flush_every:
            flush()
    flush()
    gallery.compact(space)  # merges small arrays; drops arrays orphaned by a crash
    gallery.index(space)
    gallery.save_index(space)
    report.seconds = time.perf_counter() - t0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(Path(gallery.path) / "reports" / f"index-{stamp}.json", report.to_dict())
    return report
