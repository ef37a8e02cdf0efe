"""Registry of embedding transforms: one name per kind, created and loaded by name.

``create_transform("pca-whiten-reg", dim=64)`` returns an unfitted estimator;
``load_transform(dir)`` reads any saved transform (dispatching on the header's
``kind``). Classes are imported lazily so that the closed-form transforms do
not import torch.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from galleria.errors import FormatError, InputError
from galleria.io.atomic import read_json
from galleria.transforms.base import ARTIFACT_TYPE, HEADER_FILE, Transform

#: kind -> one-line description.
TRANSFORMS: dict[str, str] = {
    "center": "mean-centring (subtract the gallery mean); keeps the dimension",
    "pca": "PCA truncation to dim components (nested prefixes)",
    "pca-whiten": "PCA-whitening to dim components: divide by sqrt(eigenvalue) (nested)",
    "pca-whiten-reg": "regularised PCA-whitening: divide by sqrt(eigenvalue + mean eigenvalue)",
    "aesvc": "AE-SVC autoencoder latent: decorrelated, unit-variance, mean-centred (torch)",
    "ss2d": "single-shot similarity-space distillation into nested prefixes (torch)",
    "ssd": "similarity-space distillation, one student per size: SS2D's upper bound (torch)",
    "matryoshka": "Matryoshka-style nested prefixes, similarity-MSE to the teacher (torch)",
}

# kind -> (module, class, preset params)
_CLASSES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "center": ("galleria.transforms.linear", "Center", {}),
    "pca": ("galleria.transforms.linear", "PCA", {}),
    "pca-whiten": ("galleria.transforms.linear", "PCAWhiten", {}),
    "pca-whiten-reg": ("galleria.transforms.linear", "PCAWhiten", {"shrinkage": "mean"}),
    "aesvc": ("galleria.transforms.aesvc", "AESVC", {}),
    "ss2d": ("galleria.transforms.ss2d", "SS2D", {}),
    "ssd": ("galleria.transforms.ss2d", "SSD", {}),
    "matryoshka": ("galleria.transforms.ss2d", "Matryoshka", {}),
}


def transform_class(kind: str) -> type[Transform]:
    """The class registered for ``kind`` (imports its module)."""
    if kind not in _CLASSES:
        raise InputError(f"unknown transform {kind!r}; known: {', '.join(TRANSFORMS)}")
    module, name, _ = _CLASSES[kind]
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, Transform)
    return cls


def create_transform(kind: str, *, dim: int | None = None, **params: Any) -> Transform:
    """An unfitted transform of ``kind`` with output size ``dim`` and other parameters.

    ``pca-whiten-reg`` is ``pca-whiten`` with ``shrinkage="mean"``.
    """
    cls = transform_class(kind)
    preset = dict(_CLASSES[kind][2])
    preset.update(params)
    try:
        return cls(dim=dim, **cls.params_from(preset))
    except TypeError as exc:
        names = ", ".join(cls._param_names())
        raise InputError(
            f"bad parameters for transform {kind!r}: {exc}; accepted: {names}"
        ) from exc


def load_transform(path: str | os.PathLike[str], *, fingerprint: str | None = None) -> Transform:
    """Load any transform saved with :meth:`Transform.save`, checking its header.

    ``fingerprint``: the model fingerprint of the embeddings it will be applied
    to; a transform fitted on another model raises CompatibilityError.
    """
    header_path = Path(path) / HEADER_FILE
    if not header_path.is_file():
        raise FormatError(f"{header_path} is missing: not a saved galleria transform")
    try:
        header = read_json(header_path)
    except (ValueError, OSError) as exc:
        raise FormatError(f"{header_path} is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("type") != ARTIFACT_TYPE:
        got = header.get("type") if isinstance(header, dict) else header.__class__.__name__
        raise FormatError(f"{header_path} holds a {got!r} artifact, not a transform")
    kind = str(header.get("kind"))
    if kind not in _CLASSES:
        raise FormatError(f"{header_path}: unknown transform kind {kind!r}")
    return transform_class(kind).load(path, fingerprint=fingerprint)
