"""Member extractors of a fused gallery, and the packed form of local feature sets.

A member is any registry extractor, named as on the command line:
``effnet-lite2``, ``opennsfw-r50``, ``effnet-lite0``, ``effnet-lite2-ms``
(multi-scale 1, 0.707, 1.414), a local extractor (``sift``, ``xfeat`` once
registered with ``kind="local"``), or a JSON extractor config.

Local sets are stored as fixed-width vectors so that they live in an ordinary
feature-store space: the ``top_n`` descriptors with the highest keypoint score,
each L2-normalised, zero rows for padding, concatenated and divided by
``sqrt(n_kept)`` (so the packed vector has unit norm). :func:`unpack_local`
undoes it; :class:`PackedLocalExtractor` is a local extractor seen through this
packing (config ``{"type": "packed-local", "base": {...}, "top_n": N}``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from galleria.errors import FormatError, InputError
from galleria.extractors.base import Extractor
from galleria.extractors.pooling import Pooling
from galleria.extractors.registry import extractor_from_config, model_kind
from galleria.fingerprint import chain
from galleria.fusion.mixer import InputSpec
from galleria.types import LocalFeatures

ALIASES: dict[str, dict[str, Any]] = {
    "effnet-lite2-ms": {"type": "effnet-lite2", "scales": [1.0, 0.707, 1.414]},
    "effnet-lite0-ms": {"type": "effnet-lite0", "scales": [1.0, 0.707, 1.414]},
}
DEFAULT_TOP_N = 64


def pack_local(feats: LocalFeatures, top_n: int) -> np.ndarray:
    """One image's local features -> ``(top_n * d,)`` float32 packed vector (see module doc)."""
    d = feats.dim
    out = np.zeros((top_n, d), np.float32)
    n = len(feats)
    if n:
        order = np.argsort(-feats.keypoints[:, 3], kind="stable")[:top_n]
        desc = np.asarray(feats.descriptors[order], np.float32)
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        out[: len(order)] = desc
        out /= np.sqrt(len(order))
    return out.reshape(-1)


def unpack_local(packed: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, top_n * d)`` packed -> ``(B, top_n, d)`` unit rows, ``(B, top_n)`` validity."""
    x = np.asarray(packed, np.float32)
    if x.ndim != 2 or x.shape[1] % top_n:
        raise InputError(f"packed local vectors must be (B, top_n * d); got {x.shape}")
    rows = x.reshape(x.shape[0], top_n, -1)
    norm = np.linalg.norm(rows, axis=2)
    valid = norm > 0
    return rows / np.maximum(norm, 1e-12)[:, :, None], valid


class PackedLocalExtractor(Extractor):
    """A local extractor whose per-image sets are packed into ``(B, top_n * d)`` vectors."""

    def __init__(self, base: Extractor, top_n: int, desc_dim: int) -> None:
        if getattr(base, "kind", "global") != "local":
            raise InputError(f"{base.name} is not a local extractor")
        if top_n < 1:
            raise InputError(f"top_n must be >= 1, got {top_n}")
        self.base = base
        self.top_n = int(top_n)
        self.desc_dim = int(desc_dim)
        super().__init__(
            name=f"{base.name}-top{top_n}", dim=self.top_n * self.desc_dim,
            preprocessing=base.preprocessing, pooling=Pooling("model"), scales=base.scales,
            weights_id=base.weights_id, source=f"{base.source} (top {top_n} packed)",
        )
        self.runtime = base.runtime
        try:
            cfg = base.config()
        except NotImplementedError:
            cfg = None
        if cfg is not None:
            ex = base._exec_options or {}
            self.set_config({"type": "packed-local", "base": cfg, "top_n": self.top_n,
                             "desc_dim": self.desc_dim}, root=base._config_root,
                            runtime=ex.get("runtime", "auto"), threads=ex.get("threads"))

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        return chain(self.base.fingerprint, f"top{self.top_n}", self.top_n, self.desc_dim)

    def prepare(self, img: Image.Image) -> tuple[np.ndarray, ...]:
        return self.base.prepare(img)

    def embed_prepared(self, per_scale: Sequence[np.ndarray]) -> np.ndarray:
        feats = self.base.embed_prepared(per_scale)
        return np.stack([pack_local(f, self.top_n) for f in feats]).astype(np.float32)  # type: ignore[arg-type]

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError("PackedLocalExtractor embeds through embed_prepared")


def packed_from_config(config: dict[str, Any], *, root: str | None, runtime: str,
                       threads: int | None) -> PackedLocalExtractor:
    """Rebuild ``{"type": "packed-local", "base": {...}, "top_n": N, "desc_dim": d}``."""

    try:
        base_cfg, top_n, desc_dim = config["base"], int(config["top_n"]), int(config["desc_dim"])
    except KeyError as exc:
        raise FormatError(f"packed-local config lacks {exc}: {config!r}") from exc
    base = extractor_from_config(base_cfg, root=root, runtime=runtime, threads=threads)
    ext = PackedLocalExtractor(base, top_n, desc_dim)
    ext.set_config(config, root=root, runtime=runtime, threads=threads)
    return ext


def split_members(text: str) -> list[str]:
    """``"a,b,{json, with commas}"`` -> member names (commas inside braces do not split)."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [m for m in out if m]


def member_config(name: str) -> dict[str, Any]:
    """A command-line member name (or JSON config) -> an extractor config."""
    name = name.strip()
    if name.startswith("{"):
        try:
            cfg = json.loads(name)
        except ValueError as exc:
            raise InputError(f"member {name!r} is not valid JSON: {exc}") from exc
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise InputError(f"member config needs a 'type': {name!r}")
        return cfg
    if name in ALIASES:
        return dict(ALIASES[name])
    return {"type": name}


def build_member(name: str, *, runtime: str = "auto", threads: int | None = None,
                 top_n: int = DEFAULT_TOP_N) -> Extractor:
    """The extractor for one member name; a local extractor comes packed (``top_n``)."""

    cfg = member_config(name)
    if cfg["type"] != "packed-local" and model_kind(cfg["type"]) == "local":
        base = extractor_from_config(cfg, runtime=runtime, threads=threads)
        dim = getattr(base, "descriptor_dim", None) or base.dim
        return PackedLocalExtractor(base, top_n, int(dim))
    ext = extractor_from_config(cfg, runtime=runtime, threads=threads)
    if getattr(ext, "kind", "global") == "local":
        raise InputError(f"{name}: a local extractor must be packed (give it by registry name)")
    return ext


def input_spec(ext: Extractor) -> InputSpec:
    """The mixer input an extractor provides."""
    if isinstance(ext, PackedLocalExtractor):
        return InputSpec(name=ext.name, fingerprint=ext.fingerprint, kind="local",
                         dim=ext.desc_dim, top_n=ext.top_n)
    return InputSpec(name=ext.name if ext.scales == (1.0,) else f"{ext.name}-ms",
                     fingerprint=ext.fingerprint, kind="global", dim=ext.dim)
