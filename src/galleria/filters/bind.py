"""Checking a filter against the fields a gallery holds, and typing its literals.

:func:`bind` is the one validator every entry point (CLI, Python API, HTTP) runs
before a filter is evaluated: a field no item has is an error naming the fields
there are (a typo should not silently match nothing), a condition whose values
cannot match the field's type is an error saying what the field holds, and an
untyped value of the compact form (``year=2010``) is typed from the field.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

from galleria.errors import InputError
from galleria.filters.model import (
    AnyOf,
    Bool,
    Exists,
    Filter,
    Literal,
    Match,
    Range,
    Scalar,
    unique_values,
    value_type,
)
from galleria.filters.values import BOOL, DATE, NUMBER, STRING

Fields = Mapping[str, Mapping[str, int]]
"""``{field: {type: items holding a value of that type}}``."""


def describe_fields(fields: Fields, limit: int = 30) -> str:
    names = sorted(fields)
    shown = ", ".join(f"{n} ({'/'.join(sorted(fields[n]))})" for n in names[:limit])
    return (shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
            ) or "none (no item has metadata)"


def _field_types(field: str, fields: Fields) -> Mapping[str, int]:
    got = fields.get(field)
    if got:
        return got
    close = difflib.get_close_matches(field, list(fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InputError(f"filter: no item has a field {field!r}{hint}; the fields are: "
                     f"{describe_fields(fields)}")


def _typed(field: str, v: Scalar | Literal, types: Mapping[str, int]) -> list[Scalar]:
    """The typed values ``v`` stands for on a field holding ``types``."""
    held = "/".join(sorted(types))
    if isinstance(v, Literal):
        out: list[Scalar] = []
        t = v.text
        if NUMBER in types:
            try:
                x = float(t)
            except ValueError:
                x = math.nan
            if math.isfinite(x):
                out.append(x)
        if BOOL in types and t.lower() in ("true", "false"):
            out.append(t.lower() == "true")
        if STRING in types or DATE in types:
            out.append(t)
        if not out:
            raise InputError(f"filter: field {field!r} holds {held} values; {t!r} is not one")
        return out
    vt = value_type(v)
    ok = (vt == STRING and (STRING in types or DATE in types)) or (vt in types)
    if not ok:
        hint = ""
        if NUMBER in types and vt == STRING:
            hint = " (write the number without quotes)"
        elif vt == NUMBER and (STRING in types or DATE in types):
            hint = " (quote it: the field holds text)"
        raise InputError(f"filter: field {field!r} holds {held} values, not {vt}s: {v!r} "
                         f"never matches{hint}")
    return [v]


def bind(f: Filter, fields: Fields) -> Filter:
    """``f`` checked against ``fields`` with its literals typed (see the module docstring).

    Raises:
        InputError: an unknown field, or a value / range that cannot match the field.
    """
    if isinstance(f, Bool):
        return Bool(tuple(bind(x, fields) for x in f.must),
                    tuple(bind(x, fields) for x in f.should),
                    tuple(bind(x, fields) for x in f.must_not))
    types = _field_types(f.field, fields)
    if isinstance(f, Exists):
        return f
    if isinstance(f, Range):
        if f.kind not in types:
            what = "dates (ISO 8601 strings)" if f.kind == DATE else "numbers"
            raise InputError(f"filter: a range on {f.field!r} needs {what}; the field holds "
                             f"{'/'.join(sorted(types))} values")
        return f
    vals = [f.value] if isinstance(f, Match) else list(f.values)
    typed: list[Scalar] = []
    errors: list[InputError] = []
    for v in vals:
        try:
            typed += _typed(f.field, v, types)
        except InputError as exc:
            errors.append(exc)
    if not typed:
        raise errors[0]
    typed = list(unique_values(typed))
    return Match(f.field, typed[0]) if len(typed) == 1 else AnyOf(f.field, tuple(typed))
