"""Robust image decoding: EXIF orientation, every colour mode to RGB, clear errors.

``load_image`` never lets a PIL or OS exception escape: anything that is not a
usable image raises :class:`ImageDecodeError` with a short reason that goes
into the extraction report. The reason names what is wrong: ``not found``,
``permission denied``, ``is a directory``, ``empty file (0 bytes)``, ``not an
image``, ``truncated image``, ``corrupt image data``, ``too many pixels``,
``image too small``.

``load_image_and_hash`` reads the file once, hashes its bytes (SHA-256) and
decodes from memory: the content hash a gallery records per item costs no
second read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import numbers
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from galleria.errors import GalleriaError, InputError

MIN_SIDE = 8
"""Images smaller than this (in either side) are rejected as unusable."""

HASH_PREFIX = "sha256:"


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


def _os_reason(p: Path, exc: OSError) -> str:
    """A short reason for an OS error opening or reading ``p``."""
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(p):
            return f"not found: broken symbolic link (target {os.readlink(p)!r} does not exist)"
        return "not found (the file does not exist)"
    if isinstance(exc, PermissionError):
        return "permission denied (the file is not readable by this user)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    return f"read error ({exc.strerror or exc})"


@contextlib.contextmanager
def _open(p: Path) -> Iterator[IO[bytes]]:
    """Open ``p`` for reading: a regular, non-empty file, else ImageDecodeError.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; it has no effect on
    regular files.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        raise ImageDecodeError(p, _os_reason(p, exc)) from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ImageDecodeError(p, _os_reason(p, exc)) from exc
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise ImageDecodeError(p, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageDecodeError(p, "not a regular file (a device, FIFO or socket)")
    if st.st_size == 0:
        os.close(fd)
        raise ImageDecodeError(p, "empty file (0 bytes)")
    with os.fdopen(fd, "rb") as fh:
        try:
            yield fh
        except OSError as exc:
            if exc.errno is None:  # PIL's own OSErrors carry no errno
                raise
            raise ImageDecodeError(p, _os_reason(p, exc)) from exc


def _decode(p: Path, source: IO[bytes], limit: int | None = None) -> Image.Image:
    """Decode an open image file (or bytes buffer) to oriented RGB (``limit``: most pixels,
    default PIL's decompression-bomb limit)."""
    try:
        with Image.open(source) as im:
            _check_pixels(p, im, limit)
            im.load()
            img = ImageOps.exif_transpose(im) or im
            img = to_rgb(img)
            img.load()
            return img
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(p, "not an image (unrecognised format)") from exc
    except Image.DecompressionBombError as exc:
        raise _too_many(p, exc, limit) from exc
    except OSError as exc:
        if exc.errno is not None:  # an error of the file system, not of the data
            raise ImageDecodeError(p, _os_reason(p, exc)) from exc
        msg = str(exc)
        if "truncated" in msg.lower():
            raise ImageDecodeError(p, f"truncated image ({msg})") from exc
        raise ImageDecodeError(p, f"corrupt image data ({msg})") from exc
    except (ValueError, SyntaxError, EOFError, IndexError) as exc:
        raise ImageDecodeError(p, f"corrupt image data ({exc})") from exc


def _check_pixels(p: Path, im: Image.Image, limit: int | None = None) -> None:
    """Refuse images above ``limit`` pixels (default PIL's decompression-bomb limit)
    before decoding them.

    (Checked here rather than by turning PIL's warning into an error: changing
    the warning filters is process-wide and races with other decoding threads.)
    """
    limit = Image.MAX_IMAGE_PIXELS if limit is None else int(limit)
    w, h = im.size
    if limit is not None and w * h > limit:
        raise ImageDecodeError(
            p, f"too many pixels ({w}x{h} = {w * h} > {limit}; a decompression bomb?)"
        )


def _too_many(p: Path, exc: Exception, limit: int | None) -> ImageDecodeError:
    """PIL refused an image at open (over twice its own limit): galleria's reason, with
    the limit that applies here, not PIL's."""
    limit = Image.MAX_IMAGE_PIXELS if limit is None else int(limit)
    m = re.search(r"\((\d+) pixels\)", str(exc))
    n = f"{int(m.group(1))} " if m else "more "
    return ImageDecodeError(p, f"too many pixels ({n}> {limit}; a decompression bomb?)")


BBox = tuple[float, float, float, float]


def parse_bbox(value: object) -> BBox | None:
    """A crop box as stored or sent: ``None``, or four finite numbers ``x1, y1, x2, y2``
    (pixels) with ``x1 < x2`` and ``y1 < y2`` -> a float tuple.

    The one rule for crop boxes (manifests, item metadata from the API, stored
    records read by ``upgrade run``, ``repair`` and thumbnails).

    Raises:
        InputError: anything else, saying what a crop box must be.
    """
    if value is None:
        return None
    rule = ("a crop box is four finite numbers [x1, y1, x2, y2] in pixels with x1 < x2 and "
            "y1 < y2")
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise InputError(f"{rule}; got {_short(value)}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise InputError(f"{rule}; got {_short(value)}")
        out.append(float(v))
    if not (out[0] < out[2] and out[1] < out[3]):
        raise InputError(f"{rule}; got {_short(value)} (not ordered)")
    return (out[0], out[1], out[2], out[3])


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finish(
    p: Path, img: Image.Image, bbox: tuple[float, float, float, float] | None, min_side: int
) -> Image.Image:
    if bbox is not None:
        try:
            x1, y1, x2, y2 = parse_bbox(bbox)  # type: ignore[misc]
        except InputError as exc:
            raise ImageDecodeError(p, str(exc)) from None
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
        ImageDecodeError: the file is missing, unreadable, a directory, empty, not
            an image, truncated or corrupt, a decompression bomb, or smaller than
            ``min_side``; ``reason`` says which.
    """
    p = Path(path)
    with _open(p) as fh:
        img = _decode(p, fh)
    return _finish(p, img, bbox, min_side)


def load_image_and_hash(
    path: str | os.PathLike[str],
    *,
    bbox: tuple[float, float, float, float] | None = None,
    min_side: int = MIN_SIDE,
) -> tuple[Image.Image, str]:
    """:func:`load_image` plus the SHA-256 of the file's bytes, from one read.

    The format is identified from the header first (so a large file that is
    not an image is not read whole), then the bytes are read once, hashed and
    decoded from memory. The hash covers the whole file, not the crop.

    Returns:
        ``(RGB image, "sha256:<64 hex digits>")``; the hash equals
        :func:`content_hash` of the same file.

    Raises:
        ImageDecodeError: as :func:`load_image`.
    """
    p = Path(path)
    with _open(p) as fh:
        try:
            with Image.open(fh) as probe:
                _check_pixels(p, probe)
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(p, "not an image (unrecognised format)") from exc
        except Image.DecompressionBombError as exc:
            raise _too_many(p, exc, None) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise ImageDecodeError(p, f"corrupt image data ({exc})") from exc
        fh.seek(0)
        data = fh.read()
    digest = HASH_PREFIX + hashlib.sha256(data).hexdigest()
    img = _decode(p, io.BytesIO(data))
    return _finish(p, img, bbox, min_side), digest


def content_hash(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """``"sha256:<hex>"`` of a file's bytes, streamed (no decoding).

    Raises:
        ImageDecodeError: the file is missing, unreadable, a directory or empty.
    """
    p = Path(path)
    h = hashlib.sha256()
    with _open(p) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return HASH_PREFIX + h.hexdigest()


def load_image_bytes(
    data: bytes,
    *,
    name: str = "upload",
    max_pixels: int | None = None,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """Decode image bytes held in memory (an upload) like :func:`load_image`.

    Args:
        data: the encoded file.
        name: how errors name the input.
        max_pixels: refuse images with more pixels than this (checked from the
            header, before decoding); default PIL's decompression-bomb limit.
            A service passes its own, lower limit: no process-wide setting changes.

    Raises:
        ImageDecodeError: empty, not an image, truncated or corrupt, too many
            pixels, or smaller than ``min_side``.
    """
    p = Path(name)
    if not data:
        raise ImageDecodeError(p, "empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(p, "not an image (unrecognised format)") from exc
    except Image.DecompressionBombError as exc:
        raise _too_many(p, exc, limit) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(p, f"corrupt image data ({exc})") from exc
    if limit is not None and w * h > limit:
        raise ImageDecodeError(
            p, f"too many pixels ({w}x{h} = {w * h} > {limit}; a decompression bomb?)")
    img = _decode(p, io.BytesIO(data), limit)
    return _finish(p, img, None, min_side)
