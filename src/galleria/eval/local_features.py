"""Local features of an evaluation task's images, cached per (task, extractor fingerprint).

Like :mod:`galleria.eval.embed` for global embeddings: the unique images of a
task (gallery items, then cropped or non-gallery queries) are extracted once
and cached under ``$GALLERIA_CACHE/local-features/<dataset>-<fingerprint>-<key>/``
(:func:`galleria.local.features.save_packed`: ``.npy`` arrays + JSON header).
The cache is keyed by the sorted set of (file, crop box), so tasks over the
same images (``smvs`` and ``smvs-ref``) share one extraction.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from galleria.cache import cache_dir
from galleria.errors import FormatError
from galleria.eval.datasets import RetrievalTask
from galleria.eval.embed import EvalImageError, _items
from galleria.extract.embed import Progress, extract_local_items
from galleria.extractors.base import Extractor
from galleria.fingerprint import digest, slug
from galleria.local.features import PackedFeatures, load_packed, pack, save_packed

log = logging.getLogger(__name__)


def task_local_features(
    task: RetrievalTask,
    extractor: Extractor,
    *,
    use_cache: bool = True,
    batch_size: int = 16,
    workers: int = 2,
    progress: Progress | None = None,
) -> tuple[PackedFeatures, np.ndarray, np.ndarray]:
    """``(features of the unique images, gallery rows (G,), query rows (Q,))``.

    ``features[gallery_rows[g]]`` is gallery item ``g``, ``features[query_rows[q]]``
    query ``q`` (a query that is an uncropped gallery item shares its row).
    """
    if extractor.kind != "local":
        raise TypeError(f"{extractor.name} is not a local extractor")
    items, g_rows, q_rows = _items(task)
    ident = [(str(it.path), None if it.bbox is None else [float(v) for v in it.bbox])
             for it in items]
    canon = sorted(set(map(repr, ident)))
    pos = {c: i for i, c in enumerate(canon)}
    remap = np.array([pos[repr(x)] for x in ident], np.int64)
    first = {}
    for i, c in enumerate(remap.tolist()):
        first.setdefault(c, i)
    unique_items = [items[first[c]] for c in range(len(canon))]
    key = digest(canon, extractor.fingerprint)
    name = Path(task.root).name
    folder = cache_dir("local-features") / f"{name}-{slug(extractor.fingerprint)}-{key}"
    if use_cache and (folder / "header.json").is_file():
        try:
            packed, header = load_packed(folder, fingerprint=extractor.fingerprint)
            if header.get("key") == key and len(packed) == len(canon):
                if progress is not None:
                    progress.update(len(items))
                return packed, remap[g_rows], remap[q_rows]
        except FormatError as exc:
            log.warning("ignoring unreadable cache %s: %s", folder, exc)
    feats, failures = extract_local_items(unique_items, extractor, batch_size=batch_size,
                                          workers=workers, progress=progress)
    if failures:
        shown = "; ".join(f"{it.path}: {why}" for it, why in failures[:5])
        raise EvalImageError(f"{len(failures)} images of {task.name} could not be read: {shown}")
    packed = pack([f for f in feats if f is not None], dim=extractor.dim)
    save_packed(Path(folder), packed, fingerprint=extractor.fingerprint,
                extra={"key": key, "task": task.name})
    return packed, remap[g_rows], remap[q_rows]
