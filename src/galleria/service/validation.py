"""What a client sends, checked at the API boundary: JSON bodies, item ids, metadata.

- **JSON** (:func:`loads`): at most :data:`MAX_JSON_DEPTH` levels of nesting (a body
  nested 100,000 deep is a 400, never a RecursionError). ``NaN`` / ``Infinity`` (not
  JSON, but what Python clients send) parse, and are refused by the field that gets
  them (an embedding: 422; metadata: 400).
- **Item ids** (:func:`check_item_id`): the one rule of :mod:`galleria.ids` (no
  control characters...), for writes and reads alike.
- **Metadata** (:func:`check_metadata`): a JSON object of at most ``limit`` bytes,
  :data:`MAX_META_DEPTH` levels, keys of printable text; the keys the server records
  itself (``path``, ``filename``, ``uploaded``, ``image_size``) are refused, and the
  keys galleria reads have a schema: ``bbox`` is a crop box (four finite numbers
  ``[x1, y1, x2, y2]`` with ``x1 < x2``, ``y1 < y2``: :func:`galleria.images.decode.
  parse_bbox`), ``priority`` a finite number (the upgrade's ``priority`` order).

Every refusal is a 400 :class:`~galleria.service.errors.ServiceError` that says what
is wrong; a record that passed these checks never breaks ``upgrade run``,
``repair`` or a thumbnail later.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from galleria.errors import InputError
from galleria.ids import id_problem
from galleria.images.decode import parse_bbox
from galleria.service.errors import bad_request

MAX_JSON_DEPTH = 32
"""Deepest nesting of a request body (the API's own bodies need 4)."""
MAX_META_DEPTH = 8
"""Deepest nesting inside an item's metadata."""
MAX_META_KEY = 256
RESERVED_META = ("path", "filename", "uploaded", "image_size")
"""Metadata keys the server records itself."""


def loads(data: bytes | str, *, what: str = "the body") -> Any:
    """Parse JSON from a client (see the module docstring); 400 on anything else."""
    try:
        obj = json.loads(data)
    except RecursionError:
        raise bad_request(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels",
                          "bad_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}", "bad_json") from None
    if depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise bad_request(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", "bad_json")
    return obj


def depth(obj: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), counted up to ``limit + 1``
    (iterative: no recursion however deep)."""
    deepest = 0
    stack = [(obj, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            d += 1
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def check_item_id(item_id: Any) -> str:
    """An item id from a client, by the rule of :mod:`galleria.ids` (400 otherwise)."""
    why = id_problem(item_id)
    if why is not None:
        if isinstance(item_id, str) and item_id and "control characters" in why:
            why += (" (an item stored under such an id by an older galleria can be removed "
                    "with `galleria remove`)")
        raise bad_request(why, "bad_id")
    return str(item_id)


def check_metadata(raw: Any, limit: int) -> dict[str, Any]:
    """Client metadata (a JSON object, or its text from a form field) by the schema of
    the module docstring; returns the object."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, (bytes, str)):
        raw = loads(raw, what="metadata")
    if not isinstance(raw, dict):
        raise bad_request("metadata must be a JSON object", "bad_metadata")
    if depth(raw, MAX_META_DEPTH) > MAX_META_DEPTH:
        raise bad_request(f"metadata is nested deeper than {MAX_META_DEPTH} levels",
                          "bad_metadata")
    try:
        size = len(json.dumps(raw, allow_nan=False))
    except ValueError:
        raise bad_request("metadata holds NaN or Infinity (send finite numbers only)",
                          "bad_metadata") from None
    if size > limit:
        raise bad_request(f"metadata is {size} bytes; the limit is {limit}", "bad_metadata")
    for key in raw:
        why = id_problem(key)
        if why is not None or len(key) > MAX_META_KEY:
            raise bad_request(f"metadata keys are printable text of at most {MAX_META_KEY} "
                              f"characters; got {key[:60]!r}", "bad_metadata")
        if key in RESERVED_META:
            raise bad_request(f"metadata key {key!r} is reserved (the server records "
                              f"{', '.join(RESERVED_META)} itself)", "bad_metadata")
    if "bbox" in raw:
        try:
            box = parse_bbox(raw["bbox"])
        except InputError as exc:
            raise bad_request(f"metadata 'bbox': {exc}", "bad_metadata") from None
        raw["bbox"] = list(box) if box is not None else None
    if "priority" in raw:
        p = raw["priority"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p):
            raise bad_request(f"metadata 'priority' must be a finite number (the upgrade's "
                              f"priority order); got {p!r}", "bad_metadata")
    return raw
