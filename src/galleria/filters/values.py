"""Typed payload values: how an item's metadata becomes filterable values.

An item's metadata is a JSON object. Each field becomes zero or more *typed
values* ``(type, number, text)``:

========  ==========================================  ===============================
type      made from                                   compared by
========  ==========================================  ===============================
string    a JSON string                               ``text`` (equality)
date      a JSON string in ISO 8601 form              ``text`` (equality), ``number``
          (``2021-05-01``, ``2021-05-01T12:30:00``,   (ranges: seconds since
          ``...Z`` or ``...+02:00``; no zone = UTC)   1970-01-01 UTC)
number    a JSON number                               ``number`` (equality, ranges)
bool      ``true`` / ``false``                        ``number`` (1 / 0, equality)
========  ==========================================  ===============================

A list holds one value per element (set membership: ``tags`` holding
``["cat", "indoor"]`` equals ``"cat"``); an object's fields are reached with a
dot (``exif.iso``); ``null`` and empty lists hold nothing (the field is
missing). This module is the one definition of the rules: the store's payload
index (:mod:`galleria.store.payloads`) and the reference evaluator
(:mod:`galleria.filters.evaluate`) both call :func:`typed_values`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

STRING, NUMBER, BOOL, DATE = "string", "number", "bool", "date"
TYPES = (STRING, NUMBER, BOOL, DATE)

_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?"
                  r"(Z|[+-]\d{2}:\d{2})?)?")
MAX_DEPTH = 4
"""Object fields deeper than this are not indexed."""


class Value(NamedTuple):
    """One typed value of a field."""

    type: str
    number: float | None
    text: str | None


def parse_date(text: str) -> float | None:
    """Seconds since 1970-01-01 UTC of an ISO 8601 date or date-time (no zone = UTC),
    ``None`` when ``text`` is not one."""
    m = _ISO.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        return None
    y, mo, d, hh, mi, ss, frac, zone = m.groups()
    tz = timezone.utc
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        try:
            tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        except ValueError:
            return None
    try:
        dt = datetime(int(y), int(mo), int(d), int(hh or 0), int(mi or 0), int(ss or 0),
                      int((frac or "0").ljust(6, "0")), tzinfo=tz)
    except ValueError:  # e.g. 2021-02-30
        return None
    return dt.timestamp()


def scalar_value(v: Any) -> Value | None:
    """The typed value of one JSON scalar (``None`` for null, NaN and non-scalars)."""
    if isinstance(v, bool):
        return Value(BOOL, 1.0 if v else 0.0, None)
    if isinstance(v, (int, float)):
        x = float(v)
        return Value(NUMBER, x, None) if math.isfinite(x) else None
    if isinstance(v, str):
        d = parse_date(v)
        return Value(DATE, d, v) if d is not None else Value(STRING, None, v)
    return None


def typed_values(meta: Mapping[str, Any] | None, *, skip: tuple[str, ...] = ("path",)
                 ) -> Iterator[tuple[str, Value]]:
    """``(field, value)`` pairs of an item's metadata (fields in ``skip`` left out: the
    server-side image ``path`` is not a payload)."""
    if not meta:
        return
    for key, v in meta.items():
        if key in skip or not isinstance(key, str):
            continue
        yield from _field_values(key, v, 0)


def _field_values(field: str, v: Any, depth: int) -> Iterator[tuple[str, Value]]:
    if isinstance(v, Mapping):
        if depth < MAX_DEPTH:
            for k, sub in v.items():
                if isinstance(k, str):
                    yield from _field_values(f"{field}.{k}", sub, depth + 1)
        return
    if isinstance(v, (list, tuple)):
        for el in v:
            sv = scalar_value(el)
            if sv is not None:
                yield field, sv
        return
    sv = scalar_value(v)
    if sv is not None:
        yield field, sv


def field_values(meta: Mapping[str, Any] | None) -> dict[str, list[Value]]:
    """``{field: [typed values]}`` of an item's metadata."""
    out: dict[str, list[Value]] = {}
    for f, v in typed_values(meta):
        out.setdefault(f, []).append(v)
    return out
