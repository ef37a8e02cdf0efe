"""The fitted query adaptation of one gallery: an artifact with a header, fingerprinted.

Layout (``<gallery>/fusion/adapt/<digest>/``)::

    header.json       {type: fusion-adaptation, format_version, params, fingerprint (the
                       fusion model's), light (the light model's fingerprint), digest,
                       info (the fit's evidence: pseudo-query scores, the decision)}
    map.safetensors   w (D, d), b (d,) float32: q = normalize(x w + b) on the light
                      model's L2-normalised vectors x

``digest`` covers the fusion model's fingerprint, the light model's, and the exact
map; the folder is named by it. The gallery space records ``{"path", "digest"}``
in its query config; loading recomputes the digest and refuses a mismatch (an
edited map, another model's fit, a half-copied folder).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, FormatError
from galleria.fingerprint import digest
from galleria.io.artifact import load_header, make_header, save_header
from galleria.io.atomic import write_bytes

ARTIFACT_TYPE = "fusion-adaptation"
FORMAT_VERSION = 1
HEADER_FILE = "header.json"
MAP_FILE = "map.safetensors"


def map_digest(model_fp: str, light_fp: str, w: np.ndarray, b: np.ndarray) -> str:
    w = np.ascontiguousarray(w, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    return digest(ARTIFACT_TYPE, FORMAT_VERSION, model_fp, light_fp, list(w.shape),
                  w.tobytes(), b.tobytes())


class QueryAdaptation:
    """``q = normalize(x w + b)``: the light model's vectors into one gallery's fused space.

    Args:
        model_fingerprint: the fusion model (the fused space) it maps into.
        light_fingerprint: the light model whose vectors ``x`` it maps.
        w: ``(D, d)``; b: ``(d,)``.
        params: how it was fitted (:class:`galleria.fusion.adapt.AdaptConfig`), recorded.
        info: the fit's evidence (:meth:`galleria.fusion.adapt.Fit.info`), recorded.
    """

    def __init__(self, *, model_fingerprint: str, light_fingerprint: str, w: np.ndarray,
                 b: np.ndarray, params: dict[str, Any] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        w = np.ascontiguousarray(w, np.float32)
        b = np.ascontiguousarray(b, np.float32)
        if w.ndim != 2 or b.shape != (w.shape[1],) or not (np.isfinite(w).all()
                                                             and np.isfinite(b).all()):
            raise FormatError(f"a query map is (D, d) + (d,) finite; got {w.shape}, {b.shape}")
        self.model_fingerprint = model_fingerprint
        self.light_fingerprint = light_fingerprint
        self.w, self.b = w, b
        self.params = dict(params or {})
        self.info = dict(info or {})
        self.digest = map_digest(model_fingerprint, light_fingerprint, w, b)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(Q, D)`` light vectors -> ``(Q, d)`` (not normalised; the extractor does)."""
        return np.asarray(x, np.float32) @ self.w + self.b

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``folder`` atomically (a temporary sibling renamed into place; an existing
        folder of the same digest is kept)."""
        from safetensors.numpy import save  # lazy: safetensors

        dest = Path(folder)
        if dest.is_dir():
            QueryAdaptation.load(dest, digest=self.digest)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write_bytes(tmp / MAP_FILE, save({"w": self.w, "b": self.b}))
            save_header(tmp / HEADER_FILE, make_header(
                type=ARTIFACT_TYPE, format_version=FORMAT_VERSION, params=self.params,
                fingerprint=self.model_fingerprint, light=self.light_fingerprint,
                digest=self.digest, info=self.info))
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, digest: str | None = None,
             model_fingerprint: str | None = None) -> QueryAdaptation:
        """Read and check a folder (``digest`` / ``model_fingerprint``: what it must be)."""
        from safetensors.numpy import load_file  # lazy: safetensors

        p = Path(folder)
        h = load_header(p / HEADER_FILE, type=ARTIFACT_TYPE, format_version=FORMAT_VERSION)
        if not (p / MAP_FILE).is_file():
            raise FormatError(f"{p / MAP_FILE} is missing: an incomplete adaptation folder")
        arrays = load_file(str(p / MAP_FILE))
        try:
            a = cls(model_fingerprint=h["fingerprint"], light_fingerprint=h["light"],
                    w=arrays["w"], b=arrays["b"], params=h.get("params"), info=h.get("info"))
        except KeyError as exc:
            raise FormatError(f"{p} lacks {exc}") from exc
        if a.digest != h.get("digest"):
            raise FormatError(f"{p}: the map does not match the digest in its header (edited, "
                              "or mixed with another fit's files)")
        if digest is not None and digest != a.digest:
            raise CompatibilityError(f"{p} is the query adaptation {a.digest!r}, but the "
                                     f"gallery records {digest!r}")
        if model_fingerprint is not None and model_fingerprint != a.model_fingerprint:
            raise CompatibilityError(
                f"{p} adapts the fusion model {a.model_fingerprint!r}, not "
                f"{model_fingerprint!r}")
        return a
