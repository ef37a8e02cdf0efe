"""An extractor followed by a fitted transform: the query path of a gallery built
through a transform (PCA-whitening, AE-SVC, SS2D ...).

The wrapper's fingerprint is the transform's output fingerprint, which chains
the model's, so a gallery built through a transform only accepts queries made
the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from galleria.errors import CompatibilityError, FormatError
from galleria.extractors.base import Extractor
from galleria.extractors.registry import extractor_from_config, resolve_path
from galleria.transforms.registry import load_transform


class TransformedExtractor(Extractor):
    """``transform(extractor(image))``; ``dim`` selects a prefix of nested transforms."""

    def __init__(self, base: Extractor, transform: Any, *, dim: int | None = None,
                 transform_path: str | None = None) -> None:
        fitted_on = getattr(transform, "input_fingerprint_", None)
        if fitted_on != base.fingerprint:  # unknown (None) is refused too: see check_fingerprint
            what = (f"embeddings of {fitted_on!r}" if fitted_on is not None
                    else "embeddings of an unknown model (fitted without a fingerprint)")
            raise CompatibilityError(
                f"the transform was fitted on {what}, but the model is {base.fingerprint!r}"
            )
        self.base = base
        self.transform = transform
        self.out_dim = int(dim or transform.output_dim_)
        super().__init__(
            name=base.name,
            dim=self.out_dim,
            preprocessing=base.preprocessing,
            pooling=base.pooling,
            scales=base.scales,
            weights_id=base.weights_id,
            source=f"{base.source} + {transform.kind} {self.out_dim}-d",
        )
        self.runtime = base.runtime
        self.kind = base.kind  # type: ignore[misc]
        if transform_path is not None:
            self.set_config(
                {"type": "transformed", "base": base.config(), "transform": str(transform_path),
                 "dim": self.out_dim},
                root=base._config_root,
                runtime=(base._exec_options or {}).get("runtime", "auto"),
                threads=(base._exec_options or {}).get("threads"),
            )

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        return str(self.transform.output_fingerprint_at(self.out_dim))

    def prepare(self, img: Image.Image) -> tuple[np.ndarray, ...]:
        return self.base.prepare(img)

    def embed_prepared(self, per_scale: Sequence[np.ndarray]) -> np.ndarray:
        x = self.base.embed_prepared(per_scale)
        return self.transform.transform(x, fingerprint=self.base.fingerprint, dim=self.out_dim)

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError("TransformedExtractor embeds through embed_prepared")


def from_config(
    config: dict[str, Any], *, root: str | None, runtime: str, threads: int | None
) -> TransformedExtractor:
    """Rebuild ``{"type": "transformed", "base": {...}, "transform": path, "dim": d}``."""

    try:
        base_cfg, path = config["base"], str(config["transform"])
    except KeyError as exc:
        raise FormatError(f"transformed extractor config lacks {exc}: {config!r}") from exc
    base = extractor_from_config(base_cfg, root=root, runtime=runtime, threads=threads)
    tr = load_transform(resolve_path(path, root), fingerprint=base.fingerprint)
    ext = TransformedExtractor(base, tr, dim=config.get("dim"), transform_path=path)
    ext.set_config(config, root=root, runtime=runtime, threads=threads)
    return ext
