"""The filter language: a small tree of conditions over typed payload values.

Conditions (each on one field; a list field satisfies a condition when one of its
elements does):

- :class:`Match` -- equality: ``label == "cat"``, ``year == 2010``, ``done == true``;
- :class:`AnyOf` -- set membership: the field equals one of several values;
- :class:`Range` -- numeric or date bounds (``gt``, ``gte``, ``lt``, ``lte``), met by
  one value of the field;
- :class:`Exists` -- the field holds a value;
- :class:`Bool` -- ``must`` (all hold), ``should`` (at least one holds, when any is
  given) and ``must_not`` (none holds), nested freely.

Values are typed as in :mod:`galleria.filters.values`. A :class:`Literal` is a
value written without a type (the compact ``--where`` form): :func:`galleria.filters.bind`
types it from the fields the gallery holds. Every node is frozen and hashable,
so a filter is a cache key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from galleria.filters.values import BOOL, DATE, NUMBER, STRING

Scalar = str | float | bool


@dataclass(frozen=True)
class Literal:
    """A value typed by the field it is compared with (``year=2010``: a number when
    ``year`` holds numbers, the text ``"2010"`` when it holds strings)."""

    text: str


def value_type(v: Scalar | Literal) -> str:
    """``string`` | ``number`` | ``bool`` | ``literal`` of a condition's value."""
    if isinstance(v, Literal):
        return "literal"
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, (int, float)):
        return NUMBER
    return STRING


def unique_values(values: Any) -> tuple[Scalar | Literal, ...]:
    """``values`` without repeats, in order (``true`` and ``1`` are different values)."""
    seen: set[tuple[str, Any]] = set()
    out: list[Scalar | Literal] = []
    for v in values:
        key = (value_type(v), v)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class Match:
    field: str
    value: Scalar | Literal


@dataclass(frozen=True)
class AnyOf:
    field: str
    values: tuple[Scalar | Literal, ...]


@dataclass(frozen=True)
class Range:
    """Bounds on a number (``kind="number"``) or a date (``kind="date"``; the bounds are
    seconds since 1970 UTC, ``text`` keeps them as written)."""

    field: str
    kind: str = NUMBER
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None
    text: tuple[tuple[str, str], ...] = ()

    def bounds(self) -> dict[str, float]:
        return {k: v for k, v in (("gt", self.gt), ("gte", self.gte), ("lt", self.lt),
                                  ("lte", self.lte)) if v is not None}

    def holds(self, x: float) -> bool:
        return ((self.gt is None or x > self.gt) and (self.gte is None or x >= self.gte)
                and (self.lt is None or x < self.lt) and (self.lte is None or x <= self.lte))


@dataclass(frozen=True)
class Exists:
    field: str


@dataclass(frozen=True)
class Bool:
    must: tuple[Filter, ...] = ()
    should: tuple[Filter, ...] = ()
    must_not: tuple[Filter, ...] = ()


Filter = Match | AnyOf | Range | Exists | Bool
Condition = Match | AnyOf | Range | Exists
RANGE_KINDS = (NUMBER, DATE)


def conditions(f: Filter) -> list[Condition]:
    """Every leaf condition of ``f`` (depth first)."""
    if isinstance(f, Bool):
        return [c for part in (f.must, f.should, f.must_not) for sub in part
                for c in conditions(sub)]
    return [f]


def is_empty(f: Filter | None) -> bool:
    """``True`` for no filter or an empty :class:`Bool` (every item matches)."""
    return f is None or (isinstance(f, Bool) and not (f.must or f.should or f.must_not))


def to_json(f: Filter) -> dict[str, Any]:
    """The JSON form of ``f`` (what :func:`galleria.filters.parse_filter` reads back)."""
    if isinstance(f, Bool):
        return {k: [to_json(x) for x in v] for k, v in
                (("must", f.must), ("should", f.should), ("must_not", f.must_not)) if v}
    if isinstance(f, Match):
        return {"key": f.field, "match": _jv(f.value)}
    if isinstance(f, AnyOf):
        return {"key": f.field, "any": [_jv(v) for v in f.values]}
    if isinstance(f, Exists):
        return {"key": f.field, "exists": True}
    if f.text:
        return {"key": f.field, "range": dict(f.text)}
    return {"key": f.field, "range": f.bounds()}


def cache_key(f: Filter) -> str:
    """A text that differs for different filters (dataclass equality does not tell
    ``true`` from ``1``; this does)."""
    return json.dumps(to_json(f), sort_keys=True)


def _jv(v: Scalar | Literal) -> Any:
    return v.text if isinstance(v, Literal) else v


def describe(f: Filter) -> str:
    """A one-line human form (``label = cat AND year >= 2010``)."""
    if isinstance(f, Bool):
        parts = [describe(x) for x in f.must]
        if f.should:
            parts.append("(" + " OR ".join(describe(x) for x in f.should) + ")")
        parts += [f"NOT {describe(x)}" for x in f.must_not]
        return " AND ".join(parts) if parts else "(everything)"
    if isinstance(f, Match):
        return f"{f.field} = {_jv(f.value)!r}"
    if isinstance(f, AnyOf):
        return f"{f.field} in {[_jv(v) for v in f.values]!r}"
    if isinstance(f, Exists):
        return f"{f.field} exists"
    ops = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
    shown = dict(f.text) if f.text else f.bounds()
    return " AND ".join(f"{f.field} {ops[k]} {v}" for k, v in shown.items())
