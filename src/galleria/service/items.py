"""Item writes and reads of the service: upload, delete, metadata, thumbnails.

An upload is decoded (refused with a 4xx if it is not a usable image), its
bytes saved under ``<gallery>/uploads/`` (content-addressed, written
atomically *before* the commit, so an item's stored image always exists), then
embedded with the extractor of each space the item belongs in and committed
through :meth:`Gallery.add` (one transaction per space, under the store's
writer lock, like ``galleria index``). A ``kill -9`` at any point leaves
either the committed item or, at worst, an unreferenced upload file.

Which spaces: the primary space and every other space holding data; during an
online upgrade the *new* space instead of the old one (the item is then never
in both; an older copy in the old space is dropped in the same transaction);
during a shadow upgrade the old space (the next ``upgrade run`` adds the new
vector).
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from galleria.errors import GalleriaError, InputError
from galleria.extract.derived import Derivers, derive_into, is_derived, live_derived
from galleria.ids import MAX_ID_CHARS as MAX_IDS
from galleria.images.decode import ImageDecodeError, load_image, load_image_bytes, parse_bbox
from galleria.io.atomic import write_bytes
from galleria.service import validation
from galleria.service.engine import Engine, public_meta
from galleria.service.errors import ServiceError, bad_request, from_galleria, not_found
from galleria.store.images import record_path
from galleria.types import MISSING_KEY

UPLOADS = "uploads"
MAX_ID_CHARS = MAX_IDS
check_item_id = validation.check_item_id
"""An item id from a client: the rule of :mod:`galleria.ids` (400 otherwise)."""
check_metadata = validation.check_metadata
"""Client metadata by the schema of :mod:`galleria.service.validation` (400 otherwise)."""


def target_spaces(engine: Engine) -> tuple[list[str], list[str]]:
    """``(spaces to embed a new item into, spaces to drop it from)``."""
    state = engine.gallery.state()
    primary = state.primary
    st = engine.upgrade_state(state)
    spaces = [s for s in state.spaces
              if (s.count > 0 or s.space == primary) and not is_derived(s.info)]
    names = [s.space for s in spaces]
    drop: list[str] = []
    if st is not None:
        if st.mode == "online":
            names = [n for n in names if n != st.old_space]
            if st.new_space not in names:
                names.insert(0, st.new_space)
            drop = [st.old_space]
        else:
            names = [n for n in names if n != st.new_space]
    return names, drop


def add_item(engine: Engine, item_id: str, data: bytes, *, filename: str = "upload",
             metadata: dict[str, Any] | None = None, replace: bool = False) -> dict[str, Any]:
    """Decode, store, embed and commit one uploaded image (see the module docstring)."""

    g = engine.gallery
    item_id = check_item_id(item_id)
    try:
        img = load_image_bytes(data, name=filename, max_pixels=engine.config.max_pixels)
    except GalleriaError as exc:
        raise from_galleria(exc) from exc
    exists = int(g.keys_of([item_id])[0]) != MISSING_KEY
    if exists and not replace:
        raise ServiceError(409, "exists", f"item {item_id!r} already exists; send "
                           "replace=true to replace its image")
    names, drop = target_spaces(engine)
    if not names:
        raise ServiceError(409, "empty_gallery",
                           "the gallery has no embedding space yet: create it with "
                           "`galleria index` first (it records the model)")
    path = save_upload(engine.path, data)
    st = path.stat()
    digest = "sha256:" + path.stem
    # recorded relative to the gallery (resolved against it on read): the gallery can be
    # served, repaired and upgraded from any working directory
    meta = {**(metadata or {}), "path": record_path(engine.path, path),
            "filename": _printable(filename)[:255],
            "uploaded": round(time.time(), 3)}
    done: dict[str, int] = {}
    derivers = _derivers(engine)
    try:
        for sp in names:
            info = g.space_info(sp)
            ext = engine.models.for_space(info.info, query=False)
            other = [d for d in drop if d != sp]
            if info.kind == "local":
                g.add_local([item_id], ext.embed_images([img]), space=sp, meta=[meta],
                            contents=[(digest, st.st_size, st.st_mtime_ns)], replace=True,
                            drop_spaces=other)
            else:
                vec = ext.embed_images([img])
                # its derived rows go in this commit: never the previous image's after a kill
                g.add([item_id], vec, space=sp, meta=[meta],
                      contents=[(digest, st.st_size, st.st_mtime_ns)], replace=True,
                      drop_spaces=[*other, *live_derived(g, sp)])
                derive_into(g, sp, [item_id], vec, derivers)  # derived spaces: a product
            done[sp] = g.generation(sp)
    except GalleriaError as exc:
        raise from_galleria(exc) from exc
    _after_add(engine)
    return {"id": item_id, "replaced": exists, "spaces": list(done), "generation": done,
            "image_size": list(img.size)}


def _derivers(engine: Engine) -> Derivers:
    """The engine's derive functions (its model cache is keyed by fingerprint, which a
    derived space shares with its query model: not used here)."""
    d = getattr(engine, "derivers", None)
    if d is None:  # an engine built without Engine.__init__ (tests)
        d = Derivers(engine.path, runtime=engine.config.runtime, threads=engine.config.threads)
        engine.derivers = d
    return d


def _after_add(engine: Engine) -> None:
    """A fused gallery grown past its adaptation's refit point: refit in the background
    (:func:`galleria.fusion.grow.schedule_refit`; one at a time, published atomically)."""
    rec = engine.gallery.get_setting("fusion")
    if isinstance(rec, dict) and rec.get("refit_at"):
        from galleria.fusion.grow import growth, schedule_refit  # lazy: torch

        if (growth(engine.gallery) or {}).get("due"):
            t = schedule_refit(engine.path, threads=engine.config.threads,
                               runtime=engine.config.runtime, stop=engine._stop)
            if t is not None:
                engine.background = [b for b in engine.background if b.is_alive()] + [t]


def save_upload(root: Path, data: bytes) -> Path:
    """Write the upload's bytes to ``uploads/<hh>/<sha256>.<ext>`` (atomic; idempotent)."""

    h = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "img").lower()
    except Exception:
        fmt = "img"
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
    path = root / UPLOADS / h[:2] / f"{h}.{ext}"
    if not path.exists() or path.stat().st_size != len(data):
        write_bytes(path, data)
    return path


def remove_item(engine: Engine, item_id: str) -> dict[str, Any]:
    g = engine.gallery
    item_id = check_item_id(item_id)
    if int(g.keys_of([item_id])[0]) == MISSING_KEY:
        raise not_found(f"no item {item_id!r} in this gallery")
    try:
        n = g.remove([item_id])
    except GalleriaError as exc:
        raise from_galleria(exc) from exc
    return {"id": item_id, "removed": True, "entries": n,
            "generation": {sp.space: g.generation(sp.space) for sp in g.spaces()}}


def get_item(engine: Engine, item_id: str) -> dict[str, Any]:
    g = engine.gallery
    item_id = check_item_id(item_id)
    rec = g.item(item_id)
    if rec is None:
        raise not_found(f"no item {item_id!r} in this gallery")
    path = rec.meta.get("path")
    return {"id": item_id, "metadata": public_meta(rec.meta), "spaces": list(rec.spaces),
            "added": rec.added, "content": rec.content,
            "has_image": bool(path) and Path(path).is_file()}


class ThumbnailCache:
    """JPEG thumbnails by (id, content hash, size), least recently used out past a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str, int]) -> bytes | None:
        with self._lock:
            v = self._data.get(key)
            if v is not None:
                self._data.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return v

    def put(self, key: tuple[str, str, int], value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._data[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, v = self._data.popitem(last=False)
                self._bytes -= len(v)

    @property
    def nbytes(self) -> int:
        return self._bytes


THUMB_SIZES = (64, 128, 256, 512)


def thumbnail(engine: Engine, cache: ThumbnailCache, item_id: str, size: int
              ) -> tuple[bytes, str]:
    """``(JPEG bytes, ETag)`` of an item's image, at most ``size`` pixels a side."""
    if size not in THUMB_SIZES:
        raise bad_request(f"size must be one of {list(THUMB_SIZES)}; got {size}", "bad_size")
    item_id = check_item_id(item_id)
    rec = engine.gallery.item(item_id)
    if rec is None:
        raise not_found(f"no item {item_id!r} in this gallery")
    meta = rec.meta
    content = rec.content or ""
    key = (item_id, content, size)
    etag = '"' + hashlib.sha1(repr(key).encode()).hexdigest()[:16] + '"'
    hit = cache.get(key)
    if hit is not None:
        return hit, etag
    path = meta.get("path")
    if not path:
        raise not_found(f"item {item_id!r} has no stored image")
    try:
        box = parse_bbox(meta.get("bbox"))
    except InputError as exc:  # a record written before the API checked metadata
        raise ServiceError(422, "bad_record", f"item {item_id!r} has an invalid stored crop "
                           f"box ({exc}); replace the item with a valid 'bbox'") from None
    try:
        img = load_image(path, bbox=box, min_side=1)
    except ImageDecodeError as exc:
        raise not_found(f"the image of item {item_id!r} is not available: "
                        f"{exc.reason}") from exc
    except GalleriaError as exc:
        raise not_found(f"the image of item {item_id!r} is not available") from exc
    img.thumbnail((size, size), Image.Resampling.LANCZOS if size <= 128 else
                  Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    cache.put(key, data)
    return data, etag


def _printable(text: str) -> str:
    """A client's file name as the record keeps it: control characters dropped."""
    return "".join(c for c in str(text) if c.isprintable())


FULL_MAX_SIDE = 4096


def full_image(engine: Engine, item_id: str) -> tuple[bytes, str]:
    """``(JPEG bytes, ETag)`` of an item's image at full size (EXIF orientation and its crop
    box applied; at most ``FULL_MAX_SIDE`` pixels a side)."""

    item_id = check_item_id(item_id)
    rec = engine.gallery.item(item_id)
    if rec is None:
        raise not_found(f"no item {item_id!r} in this gallery")
    path = rec.meta.get("path")
    if not path:
        raise not_found(f"item {item_id!r} has no stored image")
    try:
        img = load_image(path, bbox=_bbox(rec.meta.get("bbox")), min_side=1)
    except GalleriaError as exc:
        raise not_found(f"the image of item {item_id!r} is not available: {exc}") from exc
    if max(img.size) > FULL_MAX_SIDE:
        img.thumbnail((FULL_MAX_SIDE, FULL_MAX_SIDE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    etag = '"' + hashlib.sha1(repr((item_id, rec.content, "full")).encode()).hexdigest()[:16] \
        + '"'
    return buf.getvalue(), etag


def list_page(engine: Engine, *, where: Any = None, cursor: str | None = None,
              limit: int = 50, count: bool = False, space: str | None = None
              ) -> dict[str, Any]:
    """One page of items (insertion order) matching ``where``; ``count``: the total too."""
    g = engine.gallery
    try:
        if where is not None:
            where = g.bind_filter(where)
        page = g.list_items(where, space=space, cursor=cursor, limit=limit)
        out = page.to_dict(public=True)
        if count:
            out["count"] = g.count_items(where, space=space)
    except GalleriaError as exc:
        raise bad_request(str(exc), "bad_listing") from exc
    return out


def count(engine: Engine, *, where: Any = None, space: str | None = None) -> dict[str, Any]:
    g = engine.gallery
    try:
        if where is not None:
            where = g.bind_filter(where)
        return {"count": g.count_items(where, space=space)}
    except GalleriaError as exc:
        raise bad_request(str(exc), "bad_filter") from exc


def _bbox(b: Any) -> tuple[float, float, float, float] | None:
    if isinstance(b, (list, tuple)) and len(b) == 4:
        return tuple(float(v) for v in b)  # type: ignore[return-value]
    return None


__all__ = ["ThumbnailCache", "add_item", "check_item_id", "check_metadata", "count",
           "full_image", "get_item", "list_page", "remove_item", "save_upload",
           "target_spaces", "thumbnail"]
