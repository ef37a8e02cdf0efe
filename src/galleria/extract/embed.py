"""Stream images through an extractor: threaded decoding, batched inference.

Decoding and preprocessing run in a thread pool with a bounded number of
images in flight (PIL releases the GIL while decoding); inference runs on the
caller's thread in batches. Unusable inputs are returned as failures, never
raised; so are items that listing marked with a ``problem`` (not opened).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from galleria.extractors.base import Extractor
from galleria.images.decode import ImageDecodeError, content_hash, load_image_and_hash
from galleria.images.sources import SourceItem
from galleria.types import LocalFeatures

log = logging.getLogger(__name__)


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...


class Embedder(Protocol):
    """Where a job's embeddings are computed: :func:`embed_stream` (this process) or a
    distributed one (:class:`galleria.distributed.ray_embed.RayEmbedder`).

    Yields :class:`Batch` objects that together hold every item exactly once (as an
    embedded item or a failure), in any order; ``progress.update(n)`` per item.
    """

    def __call__(self, items: Sequence[SourceItem], extractor: Extractor, *,
                 batch_size: int = 32, workers: int = 2,
                 progress: Progress | None = None) -> Iterable[Batch]: ...


@dataclass(frozen=True)
class Batch:
    """Items of one inference batch and their ``(B, D)`` embeddings.

    For a local extractor (``extractor.kind == "local"``) ``features`` holds one
    :class:`~galleria.types.LocalFeatures` per item and ``vectors`` is empty
    ``(0, D)``; for a global one ``features`` is ``None``. ``hashes[i]`` is
    ``"sha256:<hex>"`` of ``items[i]``'s file bytes (computed from the same read
    that decoded it; see :func:`galleria.images.decode.load_image_and_hash`).
    """

    items: list[SourceItem]
    vectors: np.ndarray
    failures: list[tuple[SourceItem, str]]
    hashes: list[str] = field(default_factory=list)
    features: list[LocalFeatures] | None = None


def file_content(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``("sha256:<hex>", size, mtime_ns)`` of a file (what an item's identity records)."""

    st = os.stat(path)
    return content_hash(path), int(st.st_size), int(st.st_mtime_ns)


def _prepare(
    extractor: Extractor, item: SourceItem
) -> tuple[tuple[np.ndarray, ...], str] | str:
    """``(network inputs per scale, content hash)``, or the reason the item is unusable."""
    if item.problem is not None:  # found while listing (bad name, broken link...)
        return item.problem
    try:
        img, digest = load_image_and_hash(item.path, bbox=item.bbox)
        return extractor.prepare(img), digest
    except ImageDecodeError as exc:
        return exc.reason
    except Exception as exc:  # a user's odd file must not stop a long job
        log.exception("unexpected error preparing %s", item.path)
        return f"unexpected error: {type(exc).__name__}: {exc}"


def embed_stream(
    items: Iterable[SourceItem],
    extractor: Extractor,
    *,
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int | None = None,
    progress: Progress | None = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects in input order; failures ride along with the batch."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    prefetch = prefetch or max(2 * batch_size, 4 * max(1, workers))
    nscales = len(extractor.scales)
    local = extractor.kind == "local"
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        pending: deque[tuple[SourceItem, Future[Any]]] = deque()
        it = iter(items)
        exhausted = False
        ok_items: list[SourceItem] = []
        ok_inputs: list[tuple[np.ndarray, ...]] = []
        ok_hashes: list[str] = []
        failed: list[tuple[SourceItem, str]] = []

        def flush() -> Batch:
            if local:  # variable-sized inputs: a list per scale, not a stacked array
                feats = (extractor.embed_prepared([[x[s] for x in ok_inputs]
                                                   for s in range(nscales)])
                         if ok_items else [])
                return Batch(list(ok_items), np.zeros((0, extractor.dim), np.float32),
                             list(failed), list(ok_hashes), feats)
            if ok_items:
                per_scale = [np.stack([x[s] for x in ok_inputs]) for s in range(nscales)]
                vecs = extractor.embed_prepared(per_scale)
            else:
                vecs = np.zeros((0, extractor.dim), np.float32)
            return Batch(list(ok_items), vecs, list(failed), list(ok_hashes))

        while True:
            while not exhausted and len(pending) < prefetch:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((item, pool.submit(_prepare, extractor, item)))
            if not pending:
                break
            item, fut = pending.popleft()
            res = fut.result()
            if isinstance(res, str):
                failed.append((item, res))
            else:
                ok_items.append(item)
                ok_inputs.append(res[0])
                ok_hashes.append(res[1])
            if progress is not None:
                progress.update(1)
            if len(ok_items) >= batch_size:
                yield flush()
                ok_items.clear()
                ok_inputs.clear()
                ok_hashes.clear()
                failed.clear()
        if ok_items or failed:
            yield flush()


def embed_items(
    items: Sequence[SourceItem],
    extractor: Extractor,
    **kw: Any,
) -> tuple[np.ndarray, np.ndarray, list[tuple[SourceItem, str]]]:
    """Embed all items -> ``(vectors (N, D) with zero rows for failures, ok (N,), failures)``."""
    if extractor.kind == "local":
        raise TypeError("embed_items is for global extractors; use extract_local_items")
    index = {id(it): n for n, it in enumerate(items)}
    out = np.zeros((len(items), extractor.dim), np.float32)
    ok = np.zeros(len(items), dtype=bool)
    failures: list[tuple[SourceItem, str]] = []
    for batch in embed_stream(items, extractor, **kw):
        rows = [index[id(it)] for it in batch.items]
        out[rows] = batch.vectors
        ok[rows] = True
        failures.extend(batch.failures)
    return out, ok, failures


def extract_local_items(
    items: Sequence[SourceItem],
    extractor: Extractor,
    **kw: Any,
) -> tuple[list[LocalFeatures | None], list[tuple[SourceItem, str]]]:
    """Local features of all items -> ``(features (None for failures), failures)``."""
    if extractor.kind != "local":
        raise TypeError("extract_local_items needs a local extractor; use embed_items")
    index = {id(it): n for n, it in enumerate(items)}
    out: list[LocalFeatures | None] = [None] * len(items)
    failures: list[tuple[SourceItem, str]] = []
    for batch in embed_stream(items, extractor, **kw):
        assert batch.features is not None
        for it, f in zip(batch.items, batch.features, strict=True):
            out[index[id(it)]] = f
        failures.extend(batch.failures)
    return out, failures
