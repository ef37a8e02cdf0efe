"""The one rule for item ids, applied wherever an id enters galleria.

An item id is a non-empty string of valid UTF-8 (no unpaired surrogates), at most
:data:`MAX_ID_CHARS` characters long, without control characters (U+0000-U+001F,
U+007F-U+009F: a newline, a tab, an escape sequence...). Ids are printed in
reports, written into CSV manifests and terminals, and sent in URLs
(``GET /v1/items/{id}``); a control character would break each of them, so such an
id is refused where it enters: :meth:`Gallery.add` (the library and every command),
a folder's file names (reported as a skipped entry), a manifest's ``id`` column and
the HTTP API (400, for writes and reads alike).
"""

from __future__ import annotations

import re

MAX_ID_CHARS = 4096
"""Longest id (characters): a relative path under Linux's PATH_MAX fits."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def id_problem(item_id: object) -> str | None:
    """Why ``item_id`` is not a valid item id, or ``None`` when it is."""
    if not isinstance(item_id, str):
        return f"item ids must be strings; got {type(item_id).__name__}"
    if not item_id:
        return "item ids must not be empty"
    if len(item_id) > MAX_ID_CHARS:
        return f"item ids are at most {MAX_ID_CHARS} characters; got {len(item_id)}"
    try:
        item_id.encode("utf-8")
    except UnicodeEncodeError:
        return "item id is not valid UTF-8 (a file name in another encoding?)"
    m = _CONTROL.search(item_id)
    if m is not None:
        return (f"item ids must not contain control characters; got {item_id[:60]!r} "
                f"(U+{ord(m.group()):04X} at position {m.start()})")
    return None
