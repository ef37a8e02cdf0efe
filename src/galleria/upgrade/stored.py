"""The run of a transform change: ``T(stored base vector)`` of each item as its
new vector (no image read, no model run), in the batches the job commits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from galleria.extract.embed import Batch, Progress
from galleria.extractors.registry import resolve_path
from galleria.images.sources import SourceItem
from galleria.store.gallery import Gallery
from galleria.transforms.registry import load_transform
from galleria.upgrade.state import UpgradeError, UpgradeState


class _StoredVectors:
    """The 'model' of a transform change: ``T(stored base vector)`` of each item
    (what the run needs of an extractor: ``fingerprint``, ``kind``, ``dim``)."""

    kind = "global"

    def __init__(self, gallery: Gallery, base: str, transform: Any, fingerprint: str) -> None:
        self.gallery, self.base, self.transform = gallery, base, transform
        self.fingerprint = fingerprint
        self.dim = int(transform.output_dim_)

    def vectors(self, ids: list[str]) -> np.ndarray:
        keys = self.gallery.keys_of(ids)
        x = self.gallery.get_vectors(keys, space=self.base)
        return self.transform.transform(x, fingerprint=self.base).astype(np.float32)


def transform_embedder(gallery: Gallery, state: UpgradeState) -> tuple[Any, Any]:
    """``(extractor, embedder)`` for :func:`~galleria.upgrade.job.run_upgrade` of a
    transform change: batches of ``T(stored base vectors)``, no image read."""
    base = str(state.extra["base_space"])
    tr = load_transform(resolve_path(str(state.extra["transform"]), str(gallery.path)),
                        fingerprint=base)
    if tr.output_fingerprint != state.new_space:
        raise UpgradeError(f"the job's transform makes {tr.output_fingerprint!r}, the job "
                           f"fills {state.new_space!r}")
    ext = _StoredVectors(gallery, base, tr, state.new_space)

    def embed(items: Iterable[SourceItem], extractor: Any, *, batch_size: int = 32,
              workers: int = 2, progress: Progress | None = None) -> Iterator[Batch]:
        chunk: list[SourceItem] = []
        step = max(1, batch_size)
        for it in items:
            chunk.append(it)
            if len(chunk) >= step:
                yield _batch(ext, chunk, progress)
                chunk = []
        if chunk:
            yield _batch(ext, chunk, progress)

    return ext, embed


def _batch(ext: _StoredVectors, items: list[SourceItem], progress: Progress | None) -> Batch:
    ids = [it.id for it in items]
    present = ext.gallery.has(ids, ext.base)
    ok = [it for it, p in zip(items, present, strict=True) if p]
    bad = [(it, f"no vector in the base space {ext.base}") for it, p in
           zip(items, present, strict=True) if not p]
    vecs = ext.vectors([it.id for it in ok]) if ok else np.zeros((0, ext.dim), np.float32)
    if progress is not None:
        progress.update(len(items))
    return Batch(ok, vecs, bad)
