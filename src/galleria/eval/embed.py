"""Embeddings of an evaluation task's images, cached per (task, model fingerprint).

Queries that are gallery images (and are not cropped) reuse the gallery
embedding. The cache lives in ``$GALLERIA_CACHE/embeddings`` as ``.npy`` arrays
with a JSON header naming the fingerprint and a digest of the file list.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from galleria.cache import cache_dir
from galleria.errors import GalleriaError
from galleria.eval.datasets import RetrievalTask
from galleria.extract.embed import Progress, embed_items
from galleria.extractors.base import Extractor
from galleria.fingerprint import digest, slug
from galleria.images.sources import SourceItem
from galleria.io.atomic import load_array, read_json, write_json, write_npy

log = logging.getLogger(__name__)


class EvalImageError(GalleriaError):
    """An evaluation image could not be read (the data set is incomplete or corrupt)."""


def _items(task: RetrievalTask) -> tuple[list[SourceItem], np.ndarray, np.ndarray]:
    """Unique images to embed, and for each gallery item / query its row among them."""
    items = [
        SourceItem(id=f"g:{p}", path=f) for p, f in zip(task.gallery_paths, task.gallery_files(),
                                                        strict=True)
    ]
    g_rows = np.arange(len(items))
    q_rows = np.empty(task.num_queries, np.int64)
    qfiles = task.query_files()
    for j in range(task.num_queries):
        bbx = task.query_bbx[j] if task.query_bbx is not None else None
        own = int(task.query_gallery_index[j])
        if bbx is None and own >= 0:
            q_rows[j] = g_rows[own]
            continue
        q_rows[j] = len(items)
        items.append(SourceItem(id=f"q:{task.query_paths[j]}", path=qfiles[j], bbox=bbx))
    return items, g_rows, q_rows


def task_image_count(task: RetrievalTask) -> int:
    """How many images :func:`task_embeddings` embeds (a query that is a gallery image
    counts once; 0 for a task of stored descriptors)."""
    return 0 if task.vectors_loader is not None else len(_items(task)[0])


def task_embeddings(
    task: RetrievalTask,
    extractor: Extractor,
    *,
    use_cache: bool = True,
    batch_size: int = 32,
    workers: int = 2,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(queries (Q, D), gallery (G, D))`` embeddings of a task's images."""
    if task.vectors_loader is not None:
        gallery, queries = task.vectors()
        return queries, gallery
    items, g_rows, q_rows = _items(task)
    key = digest([(it.id, it.bbox) for it in items], extractor.fingerprint)
    base = cache_dir("embeddings") / f"{task.name}-{slug(extractor.fingerprint)}-{key}"
    header, array = Path(f"{base}.json"), Path(f"{base}.npy")
    if use_cache and header.is_file() and array.is_file():
        meta = read_json(header)
        if meta.get("fingerprint") == extractor.fingerprint and meta.get("key") == key:
            vecs = load_array(array)
            if progress is not None:
                progress.update(len(items))
            return vecs[q_rows], vecs[g_rows]
    vecs, ok, failures = embed_items(
        items, extractor, batch_size=batch_size, workers=workers, progress=progress
    )
    if failures:
        shown = "; ".join(f"{it.path}: {why}" for it, why in failures[:5])
        raise EvalImageError(f"{len(failures)} images of {task.name} could not be read: {shown}")
    assert ok.all()
    write_npy(array, vecs)
    meta: dict[str, Any] = {
        "type": "task-embeddings",
        "format_version": 1,
        "task": task.name,
        "fingerprint": extractor.fingerprint,
        "key": key,
        "n": len(items),
    }
    write_json(header, meta)
    return vecs[q_rows], vecs[g_rows]
