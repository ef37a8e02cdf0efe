"""Tiny deterministic extractors registered in the registry (for store and job tests).

``tiny-test`` (global): a seeded random projection of an 8x8 thumbnail, L2-normalised.
``tiny-local`` (local): the brightest pixels of a 16x16 thumbnail as keypoints with
their 3x3 RGB neighbourhoods as descriptors. Both own their config, so galleries
built with them can be repaired and searched from the record alone, and they
import no torch (subprocess tests start fast).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from galleria.extractors.base import Extractor
from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.extractors.registry import _REGISTRY, create_extractor, register_model
from galleria.types import LocalFeatures
from galleria.validate import l2_normalize


class Tiny(Extractor):
    runtime = "numpy"

    def __init__(self, seed: int = 1, dim: int = 12, delay: float = 0.0) -> None:
        super().__init__(name=f"tiny{seed}", dim=dim, preprocessing=Preprocessing(size=(8, 8)),
                         pooling=Pooling("mean"), weights_id=f"tiny-weights-{seed}",
                         source="test")
        self.proj = np.random.default_rng(seed).standard_normal((3 * 8 * 8, dim))
        self.delay = delay

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:
        time.sleep(self.delay)
        return (batch.reshape(len(batch), -1) @ self.proj).astype(np.float32)


class TinyLocal(Extractor):
    kind = "local"  # type: ignore[assignment]
    runtime = "numpy"
    descriptor_dtype = "float32"

    def __init__(self, n: int = 6) -> None:
        super().__init__(name="tinylocal", dim=27, preprocessing=Preprocessing(size=(16, 16)),
                         pooling=Pooling("mean"), weights_id="tiny-local", source="test")
        self.n = n

    def embed_prepared(self, per_scale):  # type: ignore[override]
        out = []
        for img in per_scale[0]:
            grey = img.mean(axis=0)
            if np.ptp(grey) < 1e-6:  # blank image: no keypoints
                out.append(LocalFeatures(np.zeros((0, 4), np.float32),
                                         np.zeros((0, 27), np.float32), (16, 16)))
                continue
            pad = np.pad(img, ((0, 0), (1, 1), (1, 1)))
            flat = np.argsort(-grey[1:-1, 1:-1].reshape(-1), kind="stable")[: self.n]
            ys, xs = np.unravel_index(flat, (14, 14))
            kp, desc = [], []
            for y, x in zip(ys + 1, xs + 1, strict=True):
                kp.append((x, y, 1.0, float(grey[y, x])))
                desc.append(pad[:, y : y + 3, x : x + 3].reshape(-1))
            out.append(LocalFeatures(np.array(kp, np.float32),
                                     l2_normalize(np.array(desc, np.float32)), (16, 16)))
        return out

    def _embed_scale(self, batch, scale):  # pragma: no cover
        raise NotImplementedError


def _make_tiny(*, seed: int = 1, dim: int = 12, delay: float = 0.0, **_: object) -> Tiny:
    return Tiny(seed, dim, delay)


def _make_local(*, n: int = 6, **_: object) -> TinyLocal:
    return TinyLocal(n)


if "tiny-test" not in _REGISTRY:
    register_model("tiny-test", dim=None, input_size="8x8", source="tests",
                   description="test projection")(_make_tiny)
    register_model("tiny-local", dim=27, input_size="16x16", source="tests",
                   description="test local features", kind="local")(_make_local)


def tiny(seed: int = 1, **kw: object) -> Extractor:
    return create_extractor("tiny-test", seed=seed, **kw)


def tiny_local(n: int = 6) -> Extractor:
    return create_extractor("tiny-local", n=n)


def noise_pngs(root: Path, n: int, seed: int, *, side: int = 16) -> Path:
    """``n`` seeded noise images ``00.png``, ``01.png``... in ``root`` (returned)."""
    from PIL import Image  # lazy: PIL (the module stays import-light for subprocesses)

    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(
            root / f"{i:02d}.png")
    return root
