"""Learned embedding transforms: PCA, PCA-whitening, AE-SVC, (SS)2D (estimators).

``create_transform(kind, dim=...)`` and ``load_transform(folder)`` are re-exported
lazily (torch is imported only by the trained kinds, on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TRANSFORMS", "create_transform", "load_transform"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("galleria.transforms.registry"), name)
    raise AttributeError(f"module 'galleria.transforms' has no attribute {name!r}")
