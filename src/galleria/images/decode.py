"""Robust image decoding: EXIF orientation, every colour mode to RGB, clear errors.

``load_image`` never lets a PIL exception escape: anything that is not a usable
image raises :class:`ImageDecodeError` with a short reason that goes into the
extraction report.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from galleria.errors import GalleriaError

MIN_SIDE = 8
"""Images smaller than this (in either side) are rejected as unusable."""


class ImageDecodeError(GalleriaError):
    """The file is not a usable image; ``reason`` is a short, stable description."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        grey = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        grey = ((arr - lo) / ((hi - lo) or 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    *,
    bbox: tuple[float, float, float, float] | None = None,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """Decode ``path`` to an RGB image with EXIF orientation applied.

    Args:
        path: image file.
        bbox: optional crop ``(x1, y1, x2, y2)`` in pixels of the (oriented) image.
        min_side: reject images whose shorter side is below this.

    Raises:
        ImageDecodeError: zero-byte file, not an image, truncated/corrupt data,
            decompression bomb, or an image smaller than ``min_side``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ImageDecodeError(p, f"unreadable: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageDecodeError(p, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()
                img = ImageOps.exif_transpose(im) or im
                img = to_rgb(img)
                img.load()
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(p, "not an image (unrecognised format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(p, f"too many pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(p, f"corrupt or truncated image ({exc})") from exc
    if bbox is not None:
        x1, y1, x2, y2 = (float(v) for v in bbox)
        w, h = img.size
        box = (max(0, round(x1)), max(0, round(y1)), min(w, round(x2)), min(h, round(y2)))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ImageDecodeError(p, f"crop box {bbox} is empty inside a {w}x{h} image")
        img = img.crop(box)
    if min(img.size) < min_side:
        raise ImageDecodeError(
            p, f"image too small ({img.size[0]}x{img.size[1]} px, minimum side {min_side})"
        )
    return img
