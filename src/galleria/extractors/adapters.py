"""Extractors for users who have their own weights: ``timm:<arch>``, ``dinov2:<arch>``
and ``clip:<arch>``, always from a local checkpoint file (never a hub download).

- ``timm:<arch>``: any timm architecture; ``checkpoint`` is a state dict
  (``.pth``/``.bin``/``.safetensors``) for it. CNNs are pooled by galleria
  (GeM by default) from ``forward_features``; transformers use their own head
  pooling (``pooling="model"``, e.g. the CLS token).
- ``dinov2:<arch>`` (``vits14``, ``vitb14``, ``vitl14``, ``vitg14``): the
  official facebookresearch checkpoints (``dinov2_vits14_pretrain.pth``) or a
  timm state dict, built as timm ``vit_*_patch14_dinov2`` at 224 px (position
  embeddings resampled); embedding = CLS token after the final norm.
- ``clip:<arch>``: an open_clip architecture name (``ViT-B-32``) and a local
  checkpoint; embedding = ``encode_image``.

The preprocessing comes from the library's own config for that model
(timm's ``pretrained_cfg`` / open_clip's ``preprocess_cfg``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from galleria.errors import InputError, MissingDependencyError
from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.extractors.torch_model import TorchExtractor
from galleria.fingerprint import file_sha256

DINOV2_ARCHS = {
    "vits14": "vit_small_patch14_dinov2",
    "vitb14": "vit_base_patch14_dinov2",
    "vitl14": "vit_large_patch14_dinov2",
    "vitg14": "vit_giant_patch14_dinov2",
}


def _require(module: str, pip: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{what} needs the {module!r} package, which is not installed or does not import "
            f"({exc}). Install it with: pip install {pip}"
        ) from exc


def _require_checkpoint(checkpoint: str | os.PathLike[str] | None, what: str) -> Path:
    if checkpoint is None:
        raise MissingDependencyError(
            f"{what} needs local weights: pass checkpoint=PATH (CLI: --checkpoint PATH). "
            "galleria never downloads weights."
        )
    p = Path(checkpoint)
    if not p.is_file():
        raise MissingDependencyError(f"{what}: checkpoint file {p} does not exist")
    return p


def load_state_dict(path: Path) -> dict[str, Any]:
    """Read a state dict from ``.safetensors`` or a torch file (tensors only)."""
    import torch  # lazy: torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # lazy: safetensors

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MissingDependencyError(f"cannot read checkpoint {path}: {exc}") from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise MissingDependencyError(f"{path} does not hold a state dict")
    return state


def _load(model: Any, state: dict[str, Any], why: str) -> tuple[list[str], list[str]]:
    """``load_state_dict(strict=False)`` with shape mismatches turned into a clear error."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise MissingDependencyError(f"{why}: {' '.join(first[1:3]) or exc}") from exc
    return list(missing), list(unexpected)


def _timm_preprocessing(model: Any, timm: Any) -> Preprocessing:
    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None:  # a ViT built for another size than its pretrained config says
        h, w = fixed
    return Preprocessing(
        size=(int(h), int(w)),
        resize="crop",
        crop_pct=float(cfg.get("crop_pct", 1.0)),
        mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )


def _timm_extractor(
    name: str,
    model: Any,
    checkpoint: Path,
    pooling: Pooling,
    scales: Sequence[float],
    runtime: str,
    threads: int | None,
    timm: Any,
    source: str,
) -> TorchExtractor:
    import torch  # lazy: torch

    model.eval()
    is_cnn = hasattr(model, "forward_features") and not hasattr(model, "patch_embed")
    if pooling.kind != "model" and not is_cnn:
        pooling = Pooling("model")

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            f = self.model.forward_features(x)
            if pooling.kind == "model":
                return self.model.forward_head(f, pre_logits=True)
            return f

    with torch.no_grad():
        pre = _timm_preprocessing(model, timm)
        probe = torch.zeros(1, 3, *pre.size)
        out = Backbone()(probe)
    dim = int(out.shape[1])
    backbone = Backbone().eval()
    return TorchExtractor(
        backbone_factory=lambda: backbone,
        runtime=runtime,
        threads=threads,
        name=name,
        dim=dim,
        preprocessing=pre,
        pooling=pooling,
        scales=scales,
        weights_id=file_sha256(checkpoint),
        source=source,
    )


def create_timm(
    arch: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pooling: Pooling | None = None,
    scales: Sequence[float] = (1.0,),
    runtime: str = "torch",
    threads: int | None = None,
) -> TorchExtractor:
    what = f"timm:{arch}"
    ckpt = _require_checkpoint(checkpoint, what)
    timm = _require("timm", "timm", what)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # unknown model
        raise InputError(f"timm has no architecture {arch!r}: {exc}") from exc
    state = load_state_dict(ckpt)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
    missing, unexpected = _load(model, state, f"{ckpt} does not fit timm {arch!r}")
    if missing or unexpected:
        raise MissingDependencyError(
            f"{ckpt} does not fit timm {arch!r}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return _timm_extractor(
        what,
        model,
        ckpt,
        pooling or Pooling("gem", 3.0),
        scales,
        runtime,
        threads,
        timm,
        source=f"timm {arch} from {ckpt.name}",
    )


def create_dinov2(
    arch: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    scales: Sequence[float] = (1.0,),
    runtime: str = "torch",
    threads: int | None = None,
    size: int = 224,
    pooling: Pooling | None = None,
) -> TorchExtractor:
    what = f"dinov2:{arch}"
    if arch not in DINOV2_ARCHS:
        raise InputError(f"unknown DINOv2 architecture {arch!r}; one of {sorted(DINOV2_ARCHS)}")
    ckpt = _require_checkpoint(checkpoint, what)
    timm = _require("timm", "timm", what)
    from timm.models.vision_transformer import checkpoint_filter_fn  # lazy: timm

    model = timm.create_model(DINOV2_ARCHS[arch], pretrained=False, num_classes=0, img_size=size)
    state = load_state_dict(ckpt)
    why = f"{ckpt} is not a DINOv2 {arch} checkpoint"
    try:
        state = checkpoint_filter_fn(state, model)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise MissingDependencyError(f"{why}: {exc}") from exc
    missing, unexpected = _load(model, state, why)
    if missing or unexpected:
        raise MissingDependencyError(
            f"{ckpt} is not a DINOv2 {arch} checkpoint: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    return _timm_extractor(
        what, model, ckpt, Pooling("model"), scales, runtime, threads, timm,
        source=f"DINOv2 {arch} from {ckpt.name}",
    )


def create_clip(
    arch: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    scales: Sequence[float] = (1.0,),
    runtime: str = "torch",
    threads: int | None = None,
    pooling: Pooling | None = None,
) -> TorchExtractor:
    what = f"clip:{arch}"
    ckpt = _require_checkpoint(checkpoint, what)
    open_clip = _require("open_clip", "open_clip_torch", what)
    import torch  # lazy: torch

    if arch not in open_clip.list_models():
        raise InputError(f"open_clip has no architecture {arch!r}")
    try:
        model = open_clip.create_model(arch, pretrained=str(ckpt), device="cpu")
    except Exception as exc:
        raise MissingDependencyError(
            f"{ckpt} is not an open_clip {arch} checkpoint: {exc}"
        ) from exc
    model.eval()
    cfg = model.visual.preprocess_cfg
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    resize_mode = cfg.get("resize_mode", "shortest")
    pre = Preprocessing(
        size=(int(h), int(w)),
        resize="squash" if resize_mode == "squash" else "crop",
        crop_pct=1.0,
        mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )

    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model.encode_image(x)

    backbone = Visual().eval()
    with torch.no_grad():
        dim = int(backbone(torch.zeros(1, 3, int(h), int(w))).shape[1])
    return TorchExtractor(
        backbone_factory=lambda: backbone,
        runtime=runtime,
        threads=threads,
        name=what,
        dim=dim,
        preprocessing=pre,
        pooling=Pooling("model"),
        scales=scales,
        weights_id=file_sha256(ckpt),
        source=f"open_clip {arch} from {ckpt.name}",
    )
