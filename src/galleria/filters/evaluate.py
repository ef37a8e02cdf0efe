"""The reference evaluator: does one item's metadata satisfy a filter?

Pure Python over :func:`galleria.filters.values.field_values`, one item at a
time: the definition the store's indexed evaluation
(:mod:`galleria.store.payloads`) is tested against, and the fallback for a
gallery opened read-only before it had a payload index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from galleria.filters.model import AnyOf, Bool, Exists, Filter, Literal, Match, Range
from galleria.filters.values import BOOL, DATE, NUMBER, STRING, Value, field_values


def value_equals(v: Value, target: Any) -> bool:
    """Whether a stored value equals a (typed) filter value.

    Strings compare with strings and dates by their text; numbers with numbers;
    booleans with booleans only (``true`` is not ``1``).
    """
    if isinstance(target, Literal):
        raise TypeError("bind the filter to the gallery's fields first (galleria.filters.bind)")
    if isinstance(target, bool):
        return v.type == BOOL and v.number == (1.0 if target else 0.0)
    if isinstance(target, (int, float)):
        return v.type == NUMBER and v.number == float(target)
    return v.type in (STRING, DATE) and v.text == target


def matches(f: Filter, meta: Mapping[str, Any] | None, *,
            values: dict[str, list[Value]] | None = None) -> bool:
    """Whether an item whose metadata is ``meta`` satisfies ``f`` (bound: no literals).

    ``values``: ``field_values(meta)`` when the caller has it already (many filters
    over one item)."""
    vals = field_values(meta) if values is None else values
    if isinstance(f, Bool):
        if not all(matches(x, meta, values=vals) for x in f.must):
            return False
        if f.should and not any(matches(x, meta, values=vals) for x in f.should):
            return False
        return not any(matches(x, meta, values=vals) for x in f.must_not)
    got = vals.get(f.field, [])
    if isinstance(f, Match):
        return any(value_equals(v, f.value) for v in got)
    if isinstance(f, AnyOf):
        return any(value_equals(v, t) for v in got for t in f.values)
    if isinstance(f, Exists):
        return bool(got)
    if isinstance(f, Range):
        kind = DATE if f.kind == DATE else NUMBER
        return any(v.type == kind and v.number is not None and f.holds(v.number) for v in got)
    raise TypeError(f"not a filter: {f!r}")
