"""galleria: image retrieval at scale.

The public API (imported lazily: ``import galleria`` loads neither torch nor faiss
until a name is used; ``dir(galleria)`` and ``help(galleria)`` list it)::

    galleria.index_images(src, "my.gallery", model="effnet-lite2")  # embed + store (resumable)
    s = galleria.open_searcher("my.gallery")        # the searcher the gallery calls for
    queries, result, failures = s.search_paths(["q.jpg"], k=10)
    scores, ids = result                            # (Q, K) arrays, like faiss
    g = galleria.Gallery.open("my.gallery")         # the store: vectors in, vectors out

Searching:
    open_searcher    -- the one entry: decides (``choose``) and builds the searcher
    Searcher         -- the contract every searcher implements
    SearchOptions    -- per-search options (qe, dim, funnel)
    SearchRequest    -- what a caller asks for (pipeline, space, rule)
    SearchSpec       -- what answers (the decision; hashable)
    choose           -- the decision itself (pure: gallery state + request -> spec)
    SearchResult     -- the one result type: (Q, K) scores and ids
Building galleries:
    index_images, Gallery, create_extractor, list_models, create_transform, load_transform
Errors:
    GalleriaError (every error galleria raises derives from it)

Importing the package does nothing but define names: no logging handlers, no
thread settings, no downloads.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SearchResult": "galleria.types",
    "GalleriaError": "galleria.errors",
    "Gallery": "galleria.store.gallery",
    "create_extractor": "galleria.extractors.registry",
    "list_models": "galleria.extractors.registry",
    "Searcher": "galleria.search.contract",
    "SearchOptions": "galleria.search.contract",
    "SearchRequest": "galleria.decision.choose",
    "SearchSpec": "galleria.decision.choose",
    "choose": "galleria.decision.choose",
    "open_searcher": "galleria.decision.open",
    "index_images": "galleria.extract.job",
    "create_transform": "galleria.transforms.registry",
    "load_transform": "galleria.transforms.registry",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'galleria' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
