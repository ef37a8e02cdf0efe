"""Where an item's image is: the path it records, written and read against the gallery.

An item records the file its data was made from (``meta["path"]``), so that
``galleria repair`` and ``galleria upgrade run`` can re-embed it and the service can
show it. A file inside the gallery folder (an HTTP upload, ``uploads/<hh>/<sha>``)
is recorded *relative to the gallery* and resolved against the gallery folder on
read, so the gallery can be moved and served from any working directory; any
other file is recorded as an absolute path.

Galleries written by galleria <= 0.2 recorded uploads relative to the *server's*
working directory (``g.gallery/uploads/cf/<sha>.jpg``). Such a path is found where
it can be: against the gallery, then against the working directory, then by its
``uploads/<hh>/<name>`` tail inside the gallery.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

UPLOADS = "uploads"


def record_path(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """What an item records for ``path``: POSIX and relative to ``root`` when inside it,
    else absolute (symbolic links are not resolved: a link keeps naming its target)."""
    base = Path(os.path.abspath(root))
    p = Path(os.path.abspath(path))
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


def resolve_image_path(root: str | os.PathLike[str], stored: str | None) -> str | None:
    """The absolute path of the image an item records as ``stored`` (``None`` for none).

    Relative paths are resolved against the gallery folder ``root``; a relative path
    that is not found there is looked up as written by older versions (see the module
    docstring). When no candidate exists, the gallery-relative one is returned (so
    messages name where the file is expected).
    """
    if not stored or not isinstance(stored, str):
        return None
    if os.path.isabs(stored):
        return stored
    base = Path(os.path.abspath(root))
    first = base / stored
    if stored.startswith(UPLOADS + "/") or first.is_file():  # no stat for what uploads record
        return str(first)
    legacy = Path(os.path.abspath(stored))  # relative to the working directory (<= 0.2)
    if legacy.is_file():
        return str(legacy)
    parts = PurePosixPath(stored.replace(os.sep, "/")).parts
    if UPLOADS in parts:
        at = len(parts) - 1 - parts[::-1].index(UPLOADS)
        tail = base.joinpath(*parts[at:])
        if tail.is_file():
            return str(tail)
    return str(first)
