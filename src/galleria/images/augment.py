"""Phone-like photometric and geometric augmentations (pure functions on PIL images).

What a phone photo of a gallery item does to it: a loose crop, a perspective
(the camera is not parallel to the object) with a small rotation, lighting and
white-balance changes, some blur and JPEG re-compression. Every draw comes from
the ``numpy.random.Generator`` passed in, so a view is fixed by its seed.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


@dataclass(frozen=True)
class PhoneAugment:
    """Parameters of :func:`phone_view` (recorded in the view cache key).

    Attributes:
        min_area: smallest crop, as a fraction of the image area.
        perspective: largest corner displacement, as a fraction of the side.
        rotate: largest in-plane rotation in degrees.
        brightness, contrast, saturation: largest relative change (0.4 = x0.6 .. x1.4).
        color_cast: largest per-channel gain change (white balance).
        blur: largest Gaussian blur radius in pixels of a 224-px image (applied to half
            the views).
        jpeg: ``(lowest, highest)`` JPEG quality (applied to 70 % of the views).
        downscale: see the field (applied after the photometric changes, before JPEG).
    """

    min_area: float = 0.45
    perspective: float = 0.12
    rotate: float = 10.0
    brightness: float = 0.4
    contrast: float = 0.35
    saturation: float = 0.35
    color_cast: float = 0.08
    blur: float = 1.5
    jpeg: tuple[int, int] = (25, 85)
    downscale: float = 1.0
    """Smallest final scale of the view (a uniform draw in ``[downscale, 1]``; 1: none)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["jpeg"] = list(self.jpeg)
        if self.downscale == 1.0:  # views made before the option existed keep their key
            del d["downscale"]
        return d


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """Coefficients of PIL's PERSPECTIVE transform mapping output points ``dst`` to ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.asarray(rows, np.float64)
    b = src.reshape(-1).astype(np.float64)
    return [float(c) for c in np.linalg.solve(a, b)]


def random_crop(img: Image.Image, rng: np.random.Generator, min_area: float) -> Image.Image:
    w, h = img.size
    for _ in range(10):
        area = rng.uniform(min_area, 1.0) * w * h
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x0, y0, x0 + cw, y0 + ch))
    return img


def random_perspective(img: Image.Image, rng: np.random.Generator, amount: float,
                       rotate: float) -> Image.Image:
    w, h = img.size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    theta = np.deg2rad(rng.uniform(-rotate, rotate))
    c, s = np.cos(theta), np.sin(theta)
    centre = np.array([w / 2, h / 2])
    rot = (corners - centre) @ np.array([[c, -s], [s, c]]).T + centre
    jitter = rng.uniform(-amount, amount, size=(4, 2)) * np.array([w, h])
    src = rot + jitter
    coeffs = _perspective_coeffs(src, corners)
    mean = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs,
                         Image.Resampling.BILINEAR, fillcolor=mean)


def random_light(img: Image.Image, rng: np.random.Generator, aug: PhoneAugment) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(1 + rng.uniform(-aug.brightness, aug.brightness))
    img = ImageEnhance.Contrast(img).enhance(1 + rng.uniform(-aug.contrast, aug.contrast))
    img = ImageEnhance.Color(img).enhance(1 + rng.uniform(-aug.saturation, aug.saturation))
    gains = 1 + rng.uniform(-aug.color_cast, aug.color_cast, size=3)
    arr = np.asarray(img, np.float32) * gains.astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


def phone_view(img: Image.Image, rng: np.random.Generator, aug: PhoneAugment | None = None,
               *, work_side: int | None = 320) -> Image.Image:
    """One phone-like view of an RGB image (downscaled to ``work_side`` first for speed;
    ``None``: kept at its size)."""
    aug = aug or PhoneAugment()
    img = img.convert("RGB")
    if work_side is not None and max(img.size) > work_side:
        f = work_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))),
                         Image.Resampling.BILINEAR)
    img = random_crop(img, rng, aug.min_area)
    img = random_perspective(img, rng, aug.perspective, aug.rotate)
    img = random_light(img, rng, aug)
    if rng.random() < 0.5 and aug.blur > 0:
        radius = rng.uniform(0.3, aug.blur) * max(img.size) / 224
        img = img.filter(ImageFilter.GaussianBlur(radius))
    if aug.downscale < 1.0:
        f = rng.uniform(aug.downscale, 1.0)
        img = img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))),
                         Image.Resampling.BILINEAR)
    if rng.random() < 0.7:
        img = jpeg(img, int(rng.integers(aug.jpeg[0], aug.jpeg[1] + 1)))
    return img
