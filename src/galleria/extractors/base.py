"""The extractor contract: images in, L2-normalised ``(B, D)`` float32 embeddings out.

Every extractor owns its config (timm style): :meth:`Extractor.config` returns
``{"type": <registry name>, <options>...}`` (nested for wrappers) and
:func:`galleria.extractors.registry.extractor_from_config` rebuilds the same
extractor from it alone, so a gallery, a worker process or a fused model needs
nothing but the recorded config. Extractors pickle as their config (the network
is rebuilt in the receiving process), so they can be shipped to process pools
and Ray actors.

Every extractor carries its :class:`Preprocessing`, :class:`Pooling`, scales and
a fingerprint (weights hash + preprocessing + pooling + scales + dim) that
every vector it makes is tagged with. The runtime (torch or ONNX Runtime) does
not enter the fingerprint: both compute the same function (checked in tests to
1e-4).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.fingerprint import make_fingerprint
from galleria.validate import l2_normalize


@dataclass(frozen=True)
class ModelInfo:
    """What ``galleria models`` prints and what the store records for a space."""

    name: str
    dim: int
    input_size: tuple[int, int]
    source: str
    pooling: str
    scales: tuple[float, ...]
    runtime: str
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "input_size": list(self.input_size),
            "source": self.source,
            "pooling": self.pooling,
            "scales": list(self.scales),
            "runtime": self.runtime,
            "fingerprint": self.fingerprint,
        }


class Extractor(abc.ABC):
    """Base class. Subclasses implement :meth:`_embed_scale`.

    Args:
        name: registry name (e.g. ``effnet-lite0``).
        dim: embedding dimension.
        preprocessing: input transform stored with the weights.
        pooling: global pooling recipe.
        scales: multi-scale factors; embeddings of each scale are L2-normalised,
            averaged and re-normalised.
        weights_id: a hash of the weights (file SHA-256).
        source: human-readable origin of the weights.
    """

    kind: ClassVar[str] = "global"
    """``global`` (``(B, D)`` vectors) or ``local`` (per image keypoints + descriptors)."""
    runtime: str = "torch"
    _config: dict[str, Any] | None = None
    _config_root: str | None = None
    _exec_options: dict[str, Any] | None = None
    infer_batch: int = 2
    """Largest batch handed to the network in one forward. On CPU the per-image cost
    grows with the batch beyond a few images (activations leave the cache). End to
    end (decoding threads included), EfficientNet-Lite0 on this 2-core machine gave,
    for micro-batches of 1 / 2 / 4: ONNX Runtime 132 / 130 / 124 img/s (1 thread) and
    105 / 164 / 152 (2 threads); torch 59 / 56 / 45 and 85 / 90 / 73. Larger I/O
    batches are split into micro-batches of this size."""

    def __init__(
        self,
        *,
        name: str,
        dim: int,
        preprocessing: Preprocessing,
        pooling: Pooling,
        scales: Sequence[float] = (1.0,),
        weights_id: str,
        source: str,
    ) -> None:
        if not scales:
            raise ValueError("scales must not be empty")
        self.name = name
        self.dim = int(dim)
        self.preprocessing = preprocessing
        self.pooling = pooling
        self.scales = tuple(float(s) for s in scales)
        self.weights_id = weights_id
        self.source = source

    # -- identity -------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        tag = f"{self.name}-{self.pooling.tag}-{self.preprocessing.size[0]}"
        if self.scales != (1.0,):
            tag += "-ms" + "_".join(f"{s:g}" for s in self.scales)
        return make_fingerprint(
            tag,
            self.weights_id,
            self.preprocessing.to_dict(),
            self.pooling.to_dict(),
            list(self.scales),
            self.dim,
        )

    def config(self) -> dict[str, Any]:
        """``{"type": ..., params...}``: everything :func:`extractor_from_config` needs.

        Paths inside (checkpoints, transforms) are as recorded: relative paths
        resolve against the ``root`` given when rebuilding (the gallery folder).
        Execution options (runtime, threads) are not part of the config.
        """
        if self._config is None:
            raise NotImplementedError(
                f"{type(self).__name__} was not built by the registry and records no config; "
                "build it with galleria.extractors.registry.create_extractor"
            )
        return _copy_config(self._config)

    def set_config(self, config: dict[str, Any], *, root: str | None = None,
                   runtime: str = "auto", threads: int | None = None) -> None:
        """Record how this extractor was built (called by the registry)."""
        self._config = _copy_config(config)
        self._config_root = None if root is None else str(root)
        self._exec_options = {"runtime": runtime, "threads": threads}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        ex = self._exec_options or {}
        return (_rebuild, (self.config(), self._config_root, ex.get("runtime", "auto"),
                           ex.get("threads"), self.fingerprint))

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            dim=self.dim,
            input_size=self.preprocessing.size,
            source=self.source,
            pooling=self.pooling.tag,
            scales=self.scales,
            runtime=self.runtime,
            fingerprint=self.fingerprint,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fingerprint!r}, runtime={self.runtime!r})"

    # -- embedding ------------------------------------------------------
    def prepare(self, img: Image.Image) -> tuple[np.ndarray, ...]:
        """One decoded RGB image -> one network input per scale (thread-safe)."""
        return tuple(self.preprocessing(img, s) for s in self.scales)

    def embed_prepared(self, per_scale: Sequence[np.ndarray]) -> np.ndarray:
        """Batched inputs (one ``(B, ...)`` array per scale) -> ``(B, D)`` L2-normalised."""
        if len(per_scale) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} scale batches, got {len(per_scale)}")
        acc: np.ndarray | None = None
        step = max(1, int(self.infer_batch))
        for scale, batch in zip(self.scales, per_scale, strict=True):
            batch = np.ascontiguousarray(batch, np.float32)
            parts = [self._embed_scale(batch[i:i + step], scale)
                     for i in range(0, max(1, len(batch)), step)]
            e = l2_normalize(parts[0] if len(parts) == 1 else np.concatenate(parts))
            acc = e if acc is None else acc + e
        assert acc is not None
        return l2_normalize(acc)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> ``(B, D)`` float32, L2-normalised."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        prepared = [self.prepare(im) for im in images]
        per_scale = [np.stack([p[i] for p in prepared]) for i in range(len(self.scales))]
        return self.embed_prepared(per_scale)

    @abc.abstractmethod
    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:
        """Network forward for one scale: ``(B, ...)`` inputs -> ``(B, D)`` pooled features."""


def _copy_config(cfg: dict[str, Any]) -> dict[str, Any]:

    return json.loads(json.dumps(cfg))


def _rebuild(config: dict[str, Any], root: str | None, runtime: str, threads: int | None,
             fingerprint: str) -> Extractor:
    from galleria.extractors.registry import extractor_from_config  # lazy: cycle

    return extractor_from_config(config, root=root, runtime=runtime, threads=threads,
                                 fingerprint=fingerprint)
