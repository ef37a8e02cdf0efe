"""galleria: image retrieval at scale.

Importing the package does nothing but define names: no logging handlers, no
thread settings, no downloads. The public API is re-exported lazily so that
``import galleria`` stays cheap (torch and faiss load on first use).
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
    "Searcher": "galleria.search.searcher",
    "index_images": "galleria.extract.job",
    "create_transform": "galleria.transforms.registry",
    "load_transform": "galleria.transforms.registry",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'galleria' has no attribute {name!r}")
