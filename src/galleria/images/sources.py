"""Image sources: a folder (recursive) or a CSV manifest, as ``(id, path, meta)`` items.

Item ids are stable: the path relative to the folder (POSIX separators), or the
manifest's ``id`` column when present, else its ``path`` column as written.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from galleria.errors import InputError

MANIFEST_SUFFIXES = (".csv",)


@dataclass(frozen=True)
class SourceItem:
    """One image to process: stable ``id``, file ``path`` and free-form metadata."""

    id: str
    path: Path
    meta: dict[str, str] = field(default_factory=dict)
    bbox: tuple[float, float, float, float] | None = None


def iter_folder(root: str | os.PathLike[str]) -> Iterator[SourceItem]:
    """Every regular, non-hidden file under ``root``, sorted by id.

    Files are not filtered by extension: a non-image file is reported by the
    extraction job rather than silently ignored.
    """
    base = Path(root)
    found: list[SourceItem] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.is_file():
                found.append(SourceItem(id=p.relative_to(base).as_posix(), path=p))
    found.sort(key=lambda it: it.id)
    yield from found


def read_manifest(path: str | os.PathLike[str]) -> list[SourceItem]:
    """Items of a CSV manifest with a ``path`` column (relative to the CSV's folder).

    Optional columns: ``id`` (else the path is the id), ``x1,y1,x2,y2`` (a crop
    box); every other column goes into ``meta``.
    """
    p = Path(path)
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise InputError(f"manifest {p} needs a 'path' column; has {reader.fieldnames}")
        rows = list(reader)
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
        if item_id in seen:
            raise InputError(f"manifest {p} line {n}: duplicate id {item_id!r}")
        seen.add(item_id)
        file = Path(rel) if os.path.isabs(rel) else p.parent / rel
        bbox = None
        if all(row.get(c) not in (None, "") for c in box_cols):
            try:
                bbox = tuple(float(row[c]) for c in box_cols)  # type: ignore[assignment]
            except ValueError as exc:
                raise InputError(f"manifest {p} line {n}: bad crop box: {exc}") from exc
        meta = {k: v for k, v in row.items() if k not in ("path", "id", *box_cols) and k}
        items.append(SourceItem(id=item_id, path=file, meta=meta, bbox=bbox))  # type: ignore[arg-type]
    return items


def list_source(src: str | os.PathLike[str]) -> list[SourceItem]:
    """A folder or a ``.csv`` manifest as a list of items."""
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
