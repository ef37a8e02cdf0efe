"""``galleria repair`` with re-embedding: the store's repair, given a way to re-make
data from images (each space's own extractor, rebuilt from its recorded config)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from galleria.extract.embed import Progress, embed_stream
from galleria.extract.spaces import extractor_from_space
from galleria.images.sources import SourceItem
from galleria.store.gallery import Gallery
from galleria.store.integrity import RepairReport
from galleria.store.integrity import repair as repair_store


def repair(g: Gallery, *, reembed: bool = True, runtime: str = "auto",
           threads: int | None = None, progress: Progress | None = None) -> RepairReport:
    """Repair ``g``; items whose data was damaged are re-embedded from their stored image
    paths (``reembed=False``: recorded as lost instead)."""

    def remake(info: Any, items: list[SourceItem]) -> Iterator[Any]:
        ext = extractor_from_space(info.info, root=g.path, runtime=runtime, threads=threads)
        yield from embed_stream(items, ext, progress=progress)

    return repair_store(g, reembed=remake if reembed else None)
