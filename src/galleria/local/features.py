"""Checks and array layouts for sets of :class:`~galleria.types.LocalFeatures`.

Descriptors come as float32 (L2-normalised rows: XFeat) or uint8 (RootSIFT x
500: SIFT). Every index and matcher works on :func:`float_descriptors`, the
L2-normalised float32 view of either.

A set of ``N`` images is packed as flat arrays (:class:`PackedFeatures`):
``keypoints (T, 4)``, ``descriptors (T, d)``, ``offsets (N + 1,)`` int64 and
``sizes (N, 2)`` int32, image ``i`` owning rows ``offsets[i]:offsets[i+1]``.
:func:`save_packed` / :func:`load_packed` write them as ``.npy`` files plus a
JSON header (no pickle), each file atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import FormatError, InputError
from galleria.io.artifact import check_fingerprint, load_header, make_header, save_header
from galleria.io.atomic import load_array, write_npy
from galleria.types import LocalFeatures


def float_descriptors(desc: np.ndarray) -> np.ndarray:
    """``(n, d)`` uint8 or float descriptors -> L2-normalised float32 (zero rows stay 0)."""
    x = np.asarray(desc, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def check_features(
    features: Sequence[LocalFeatures], *, dim: int | None = None, name: str = "features",
    allow_empty: bool = True,
) -> list[LocalFeatures]:
    """Validate a list of LocalFeatures (type, one dimension, finite values)."""
    if isinstance(features, LocalFeatures):
        raise InputError(f"{name} must be a list of LocalFeatures (one per image), not one")
    out = list(features)
    for i, f in enumerate(out):
        if not isinstance(f, LocalFeatures):
            raise InputError(f"{name}[{i}] is a {type(f).__name__}, not LocalFeatures")
        if len(f) and dim is not None and f.dim != dim:
            raise InputError(f"{name}[{i}] has {f.dim}-d descriptors, expected {dim}")
        d = f.descriptors
        if d.dtype != np.uint8 and not np.issubdtype(d.dtype, np.floating):
            raise InputError(f"{name}[{i}]: descriptors must be float or uint8, not {d.dtype}")
        if len(f) and np.issubdtype(d.dtype, np.floating) and not np.isfinite(d).all():
            raise InputError(f"{name}[{i}]: descriptors contain NaN or inf")
        if len(f) and not np.isfinite(f.keypoints).all():
            raise InputError(f"{name}[{i}]: keypoints contain NaN or inf")
        if not allow_empty and len(f) == 0:
            raise InputError(f"{name}[{i}] has no keypoints")
    return out


@dataclass(frozen=True)
class PackedFeatures:
    """``N`` images' local features in flat arrays (see module docstring)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def __getitem__(self, i: int) -> LocalFeatures:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        w, h = (int(v) for v in self.sizes[i])
        return LocalFeatures(self.keypoints[a:b], self.descriptors[a:b], (w, h))

    def to_list(self) -> list[LocalFeatures]:
        return [self[i] for i in range(len(self))]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def pack(features: Sequence[LocalFeatures], *, dim: int | None = None) -> PackedFeatures:
    """Concatenate a list of LocalFeatures (one descriptor dtype and dimension)."""
    feats = check_features(features, dim=dim)
    d = dim if dim is not None else next((f.dim for f in feats if len(f)), 0)
    dtypes = {f.descriptors.dtype for f in feats if len(f)}
    if len(dtypes) > 1:
        raise InputError(f"features mix descriptor dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
    counts = np.array([len(f) for f in feats], np.int64)
    offsets = np.zeros(len(feats) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    kp = np.zeros((int(offsets[-1]), 4), np.float32)
    desc = np.zeros((int(offsets[-1]), d), dtype)
    for i, f in enumerate(feats):
        if len(f):
            kp[offsets[i]:offsets[i + 1]] = f.keypoints
            desc[offsets[i]:offsets[i + 1]] = f.descriptors
    sizes = np.array([f.image_size for f in feats], np.int32).reshape(-1, 2)
    return PackedFeatures(kp, desc, offsets, sizes)


PACKED_TYPE = "local-features"
PACKED_VERSION = 1


def save_packed(path: str | os.PathLike[str], packed: PackedFeatures, *,
                fingerprint: str | None, extra: dict[str, Any] | None = None) -> None:
    """Write ``packed`` into folder ``path`` (four ``.npy`` files, then ``header.json``)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("keypoints", "descriptors", "offsets", "sizes"):
        write_npy(root / f"{name}.npy", getattr(packed, name))
    save_header(root / "header.json", make_header(
        type=PACKED_TYPE, format_version=PACKED_VERSION, params={}, fingerprint=fingerprint,
        n=len(packed), total=int(packed.offsets[-1]), dim=int(packed.descriptors.shape[1]),
        **(extra or {})))


def load_packed(path: str | os.PathLike[str], *, fingerprint: str | None = None,
                mmap: bool = False) -> tuple[PackedFeatures, dict[str, Any]]:
    """Read what :func:`save_packed` wrote; checks the fingerprint and the array shapes."""
    root = Path(path)
    header = load_header(root / "header.json", type=PACKED_TYPE, format_version=PACKED_VERSION)
    check_fingerprint(fingerprint, header.get("fingerprint"), what=f"local features at {root}")
    arrs = {}
    for name in ("keypoints", "descriptors", "offsets", "sizes"):
        f = root / f"{name}.npy"
        if not f.is_file():
            raise FormatError(f"local features at {root}: {f.name} is missing")
        arrs[name] = load_array(f, mmap_mode="r" if mmap else None)
    p = PackedFeatures(**arrs)
    if (len(p) != header.get("n") or int(p.offsets[-1]) != p.keypoints.shape[0]
            or p.descriptors.shape[0] != p.keypoints.shape[0] or p.sizes.shape[0] != len(p)):
        raise FormatError(f"local features at {root}: array shapes do not match the header")
    return p, header
