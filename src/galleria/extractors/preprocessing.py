"""Preprocessing stored with the weights (timm style): the transform is rebuilt from it.

The same :class:`Preprocessing` drives the torch and the ONNX Runtime paths and
is part of the model fingerprint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL RGB image becomes the network input.

    Attributes:
        size: network input ``(height, width)`` at scale 1.
        resize: ``"squash"`` resizes to ``size`` ignoring aspect ratio;
            ``"crop"`` resizes the shorter side to ``size / crop_pct`` then
            centre-crops ``size``; ``"squash-crop"`` squashes to
            ``size / crop_pct`` then centre-crops ``size`` (Caffe style).
        crop_pct: used by ``"crop"`` (timm convention; e.g. 224/256 = 0.875).
        mean, std: per-channel normalisation applied after ``scale``.
        scale: pixel multiplier before normalisation (1/255 for [0, 1] inputs).
        channel_order: ``"RGB"`` or ``"BGR"``.
        layout: ``"NCHW"`` (torch) or ``"NHWC"``.
        interpolation: resampling filter name.
    """

    size: tuple[int, int]
    resize: Literal["squash", "crop", "squash-crop"] = "squash"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    scale: float = 1.0 / 255.0
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        d["size"] = tuple(d["size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)

    def scaled_size(self, scale: float) -> tuple[int, int]:
        h, w = self.size
        if scale == 1.0:
            return h, w
        return max(16, round(h * scale)), max(16, round(w * scale))

    def __call__(self, img: Image.Image, scale: float = 1.0) -> np.ndarray:
        """PIL RGB image -> float32 array ``(3, H, W)`` (or ``(H, W, 3)`` for NHWC)."""
        h, w = self.scaled_size(scale)
        filt = _INTERP[self.interpolation]
        if self.resize == "squash":
            img = img.resize((w, h), filt)
        elif self.resize == "squash-crop":
            nh, nw = round(h / self.crop_pct), round(w / self.crop_pct)
            img = img.resize((nw, nh), filt)
            left, top = (nw - w) // 2, (nh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        else:
            short = round(min(h, w) / self.crop_pct)
            iw, ih = img.size
            if iw <= ih:
                nw, nh = short, max(short, round(ih * short / iw))
            else:
                nw, nh = max(short, round(iw * short / ih)), short
            img = img.resize((nw, nh), filt)
            left, top = (nw - w) // 2, (nh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32)
        if self.channel_order == "BGR":
            arr = arr[:, :, ::-1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arr = (arr * np.float32(self.scale) - mean) / std
        if self.layout == "NCHW":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=np.float32)
