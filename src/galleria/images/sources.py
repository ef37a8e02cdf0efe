"""Image sources: a folder (recursive) or a CSV manifest, as ``(id, path, meta)`` items.

Item ids are stable: the path relative to the folder (POSIX separators), or the
manifest's ``id`` column when present, else its ``path`` column as written.

Listing never aborts on one odd entry. What a folder holds but cannot be
indexed -- a file name that is not valid UTF-8, a broken symbolic link, a
symbolic link to a folder (not followed), a device or FIFO, a sub-folder that
cannot be read, a galleria gallery inside the folder (its own files are never
ingested) -- is listed as a :class:`SourceItem` whose ``problem`` says why;
:func:`galleria.extract.embed.embed_stream` reports such items as failures
without opening them, so they reach the job's report and the gallery's
failure records like any unusable image. :func:`split_problems` separates them.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from galleria.errors import InputError
from galleria.ids import id_problem
from galleria.images.decode import parse_bbox

MANIFEST_SUFFIXES = (".csv",)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
GALLERY_MARKERS = ("gallery.json", "gallery.sqlite")
"""Files whose presence marks a folder as a galleria gallery (see galleria.store)."""


@dataclass(frozen=True)
class SourceItem:
    """One image to process: stable ``id``, file ``path`` and free-form metadata.

    ``problem`` is set on entries found while listing that cannot be processed
    (see the module docstring); their ``id`` and ``path`` are printable text
    (undecodable bytes shown as ``\\xNN``), for reports only.
    """

    id: str
    path: Path
    meta: dict[str, str] = field(default_factory=dict)
    bbox: tuple[float, float, float, float] | None = None
    problem: str | None = None


def split_problems(items: Iterable[SourceItem]) -> tuple[list[SourceItem], list[SourceItem]]:
    """``(usable items, items with a problem)``, each in input order."""
    ok: list[SourceItem] = []
    bad: list[SourceItem] = []
    for it in items:
        (bad if it.problem is not None else ok).append(it)
    return ok, bad


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False
    return True


def _printable(text: str) -> str:
    """``text`` with undecodable file-name bytes and control characters as ``\\xNN``
    (safe for SQLite, JSON, a tty)."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _problem(base: Path, path: Path, reason: str, *, folder: bool = False) -> SourceItem:
    rel = _printable(path.relative_to(base).as_posix()) + ("/" if folder else "")
    return SourceItem(id=rel, path=Path(_printable(str(path))), problem=reason)


def is_gallery_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a galleria gallery (``gallery.json`` + ``gallery.sqlite``)."""
    p = Path(path)
    return all(os.path.isfile(p / name) for name in GALLERY_MARKERS)  # False on EACCES


def iter_folder(root: str | os.PathLike[str]) -> Iterator[SourceItem]:
    """Every non-hidden file under ``root``, sorted by id, with problem entries.

    Files are not filtered by extension: a non-image file is reported by the
    extraction job rather than silently ignored. Hidden files and folders
    (``.name``) are skipped silently. Entries that cannot be indexed carry a
    ``problem`` (see the module docstring); a sub-folder is reported once, not
    per file.

    Raises:
        InputError: ``root`` itself cannot be read, or is a gallery.
    """
    base = Path(root)
    if is_gallery_folder(base):
        raise InputError(f"{base} is a galleria gallery, not a folder of images")
    found: list[SourceItem] = []
    root_error: list[OSError] = []

    def onerror(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else base
        if where == base:
            root_error.append(exc)
        else:
            found.append(_problem(base, where, f"folder cannot be read "
                                               f"({exc.strerror or exc}); its files are skipped",
                                  folder=True))

    for dirpath, dirnames, filenames in os.walk(base, onerror=onerror):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            sub = here / d
            if d.startswith("."):
                continue
            if sub.is_symlink():
                found.append(_problem(base, sub, "symbolic link to a folder: not followed "
                                                 "(index its target separately)", folder=True))
            elif not _is_utf8(d):
                found.append(_problem(base, sub, f"folder name is not valid UTF-8: "
                                                 f"{d!r}; its files are skipped (rename it)",
                                      folder=True))
            elif _CONTROL.search(d):
                found.append(_problem(base, sub, f"folder name contains a control character: "
                                                 f"{d!r}; its files are skipped (rename it: "
                                                 "item ids never hold one)", folder=True))
            elif is_gallery_folder(sub):
                found.append(_problem(base, sub, "holds a galleria gallery (gallery.json + "
                                                 "gallery.sqlite): its files are not indexed",
                                      folder=True))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            p = here / name
            if not _is_utf8(name):
                found.append(_problem(base, p, f"file name is not valid UTF-8: {name!r} "
                                               "(rename the file to index it)"))
                continue
            rel = p.relative_to(base).as_posix()
            reason = _file_problem(p)
            if reason is None and id_problem(rel) is not None:
                reason = (f"its name cannot be an item id ({id_problem(rel)}); rename the "
                          "file to index it")
            if reason is None:
                found.append(SourceItem(id=rel, path=p))
            else:
                found.append(_problem(base, p, reason))
    if root_error:
        exc = root_error[0]
        raise InputError(f"folder {base} cannot be read: {exc.strerror or exc}") from exc
    found.sort(key=lambda it: it.id)
    yield from found


def _file_problem(p: Path) -> str | None:
    """Why the directory entry ``p`` cannot be an image file, or None."""
    try:
        st = p.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            return (f"symbolic link loop (it points to {_printable(target)!r}, which leads back "
                    "to itself)")
        if not isinstance(exc, FileNotFoundError):
            return f"cannot be read ({exc.strerror or exc})"
        if p.is_symlink():
            try:
                target = os.readlink(p)
            except OSError:
                target = "?"
            return f"broken symbolic link (its target {_printable(target)!r} does not exist)"
        return "vanished while listing"
    if stat.S_ISREG(st.st_mode):
        return None
    return "not a regular file (a device, FIFO or socket)"


def _decode_manifest(p: Path) -> str:
    """The text of a CSV manifest: UTF-8, with or without a byte-order mark."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"manifest {p} cannot be read: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        at = exc.start + (len(data) - len(exc.object))  # the codec drops a BOM first
        line = data.count(b"\n", 0, at) + 1
        col = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise InputError(
            f"manifest {p} is not UTF-8: line {line}, column {col} (byte offset {at}) holds "
            f"byte 0x{data[at]:02x}, which is not valid UTF-8 there. Save the file as UTF-8 "
            "(in a spreadsheet: 'CSV UTF-8'; or iconv -f latin1 -t utf-8) and re-run."
        ) from exc


def read_manifest(path: str | os.PathLike[str]) -> list[SourceItem]:
    """Items of a CSV manifest with a ``path`` column (relative to the CSV's folder).

    Optional columns: ``id`` (else the path is the id), ``x1,y1,x2,y2`` (a crop
    box); every other column goes into ``meta``. The file must be UTF-8; a
    byte-order mark (as spreadsheets write it) is accepted.

    Raises:
        InputError: not UTF-8 (naming the line and the byte), not parseable as
            CSV, no ``path`` column, no rows, an empty path, a duplicate id or a
            bad crop box.
    """
    p = Path(path)
    text = _decode_manifest(p)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise InputError(f"manifest {p} needs a 'path' column; has {reader.fieldnames}")
        rows = list(reader)
    except csv.Error as exc:
        raise InputError(f"manifest {p} line {reader.line_num}: not valid CSV: {exc}") from exc
    if not rows:
        raise InputError(f"manifest {p} has no rows")
    items: list[SourceItem] = []
    seen: set[str] = set()
    box_cols = ("x1", "y1", "x2", "y2")
    for n, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise InputError(f"manifest {p} line {n}: empty path")
        item_id = (row.get("id") or "").strip() or rel
        why = id_problem(item_id)
        if why is not None:
            raise InputError(f"manifest {p} line {n}: {why}")
        if item_id in seen:
            raise InputError(f"manifest {p} line {n}: duplicate id {item_id!r}")
        seen.add(item_id)
        file = Path(rel) if os.path.isabs(rel) else p.parent / rel
        bbox = None
        if all(row.get(c) not in (None, "") for c in box_cols):
            try:
                bbox = parse_bbox([float(row[c]) for c in box_cols])  # type: ignore[index]
            except ValueError as exc:
                raise InputError(f"manifest {p} line {n}: bad crop box: {exc}") from exc
            except InputError as exc:
                raise InputError(f"manifest {p} line {n}: bad crop box: {exc}") from None
        meta = {k: v for k, v in row.items() if k not in ("path", "id", *box_cols) and k}
        items.append(SourceItem(id=item_id, path=file, meta=meta, bbox=bbox))  # type: ignore[arg-type]
    return items


def list_source(src: str | os.PathLike[str]) -> list[SourceItem]:
    """A folder or a ``.csv`` manifest as a list of items (problem entries included).

    Raises:
        InputError: ``src`` does not exist, is neither a folder nor a manifest,
            is a folder with no files, or a bad manifest.
    """
    p = Path(src)
    if p.is_dir():
        items = list(iter_folder(p))
        if not items:
            raise InputError(f"folder {p} contains no files")
        return items
    if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest(p)
    if p.exists():
        raise InputError(f"{p} is neither a folder nor a .csv manifest")
    raise InputError(f"{p} does not exist")
