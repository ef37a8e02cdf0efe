"""A model as one value: its registry name and options, built once at an entry point.

Entry points (the CLI, a benchmark, the service) turn what the user asked for
into a :class:`ModelSpec` and pass that one value on; :meth:`ModelSpec.build`
makes the extractor, whose ``config()`` is what a gallery records. Execution
options (``runtime``, ``threads``) are not part of the spec: they say how to run
a model, not which model it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from galleria.errors import InputError
from galleria.extractors.base import Extractor
from galleria.extractors.registry import create_extractor


@dataclass(frozen=True)
class ModelSpec:
    """Which extractor: a registry name (``effnet-lite2``, ``timm:<arch>``...) and options.

    Attributes:
        name: the registry name (``galleria models``).
        pooling: ``gem``, ``gem<p>``, ``mean`` or ``model`` (default: the model's).
        scales: image scales averaged (multi-scale embedding).
        checkpoint: local weights for the ``timm:`` / ``dinov2:`` / ``clip:`` families.
        size: input size in pixels (default: the model's).
        resize: ``crop`` or ``squash`` (default: the model's).
    """

    name: str
    pooling: str | None = None
    scales: tuple[float, ...] = (1.0,)
    checkpoint: str | None = None
    size: int | None = None
    resize: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a model name is required (see `galleria models`); got "
                             f"{self.name!r}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))

    @classmethod
    def of(cls, model: str | ModelSpec, **options: Any) -> ModelSpec:
        """``model`` as a spec (a name gets ``options``; ``None`` options are ignored)."""
        if isinstance(model, ModelSpec):
            return model
        opts = {k: v for k, v in options.items() if v is not None}
        if "scales" in opts and isinstance(opts["scales"], Sequence):
            opts["scales"] = tuple(opts["scales"])
        return cls(model, **opts)

    def options(self) -> dict[str, Any]:
        """The options given (defaults left out), as :func:`create_extractor` takes them."""
        out: dict[str, Any] = {}
        for k in ("pooling", "checkpoint", "size", "resize"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.scales != (1.0,):
            out["scales"] = self.scales
        return out

    def build(self, *, runtime: str = "auto", threads: int | None = None) -> Extractor:
        """The extractor (its ``config()`` rebuilds it from a gallery's record)."""
        return create_extractor(self.name, runtime=runtime, threads=threads, **self.options())
