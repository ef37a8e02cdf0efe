"""Global pooling of ``(B, C, H, W)`` feature maps: pure functions and a torch module.

GeM (Radenovic et al.): ``(mean(clamp(x, eps)^p))^(1/p)``; p = 1 is mean pooling,
p -> inf tends to max pooling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class Pooling:
    """Pooling recipe recorded in the fingerprint. ``kind`` is ``gem``, ``mean`` or ``model``.

    ``model`` means the network's own head pooling (e.g. a ViT's CLS token).
    """

    kind: Literal["gem", "mean", "model"] = "gem"
    p: float = 3.0
    eps: float = 1e-6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tag(self) -> str:
        return f"gem{self.p:g}" if self.kind == "gem" else self.kind


def gem_numpy(x: np.ndarray, *, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """GeM over spatial axes of ``(B, C, H, W)`` -> ``(B, C)``."""
    x = np.clip(x.astype(np.float64), eps, None)
    return np.power(np.power(x, p).mean(axis=(2, 3)), 1.0 / p).astype(np.float32)


def pool_torch(x: Any, pooling: Pooling) -> Any:
    """Pool a torch ``(B, C, H, W)`` tensor according to ``pooling`` -> ``(B, C)``."""
    if pooling.kind == "mean":
        return x.mean(dim=(2, 3))
    if pooling.kind == "gem":
        return x.clamp(min=pooling.eps).pow(pooling.p).mean(dim=(2, 3)).pow(1.0 / pooling.p)
    raise ValueError(f"pool_torch cannot apply {pooling.kind!r} pooling to a feature map")
