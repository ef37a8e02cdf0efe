"""Reading filters: the JSON form (HTTP, Python) and the compact ``--where`` form (CLI).

JSON form (as in the HTTP API and :func:`parse_filter`)::

    {"must": [{"key": "label", "match": "cat"},
              {"key": "year", "range": {"gte": 2000, "lt": 2010}},
              {"key": "taken", "range": {"gte": "2021-05-01"}}],
     "should": [{"key": "tags", "any": ["indoor", "studio"]}],
     "must_not": [{"key": "done", "match": true}, {"key": "flag", "exists": true}]}

A condition is ``{"key": F, "match": V}``, ``{"key": F, "any": [V, ...]}``,
``{"key": F, "range": {"gt"|"gte"|"lt"|"lte": bound}}`` (numbers, or ISO dates
for a date range) or ``{"key": F, "exists": true}``; ``must`` / ``should`` /
``must_not`` nest. A shorthand object without those words, ``{"label": "cat",
"year": {"gte": 2000}, "tags": ["a", "b"]}``, means all of its fields (a list:
any of its values; an object: a range).

Compact form (``galleria search --where``; several ``--where`` must all hold)::

    label=cat               equality (a value typed by the field: year=2010 is a number
                            when year holds numbers)
    label=cat,dog           any of
    label!=cat              not equal (and not any of, with commas)
    year>=2000  year<2010   ranges (>, >=, <, <=); dates: taken>=2021-05-01
    year=2000..2010         inclusive range
    label=cat OR year<2000  alternatives (at least one holds)
    'label="a,b"'           a quoted value (JSON string syntax) keeps commas and spaces
    '{"must": [...]}'       the JSON form

Every mistake is an :class:`~galleria.errors.InputError` saying where and what.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

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
)
from galleria.filters.values import DATE, NUMBER, parse_date

MAX_NODES = 512
"""Conditions and groups in one filter, at most."""
MAX_DEPTH = 8
MAX_VALUES = 10_000
"""Values in one ``any`` list, at most."""
MAX_FIELD = 200
BOOL_KEYS = ("must", "should", "must_not")
COND_KEYS = ("match", "any", "range", "exists")
RANGE_OPS = ("gt", "gte", "lt", "lte")


class _Budget:
    def __init__(self) -> None:
        self.nodes = 0

    def take(self, where: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise InputError(f"filter: more than {MAX_NODES} conditions (at {where})")


# ------------------------------------------------------------------ JSON form
def parse_filter(obj: Any) -> Filter:
    """A filter from its JSON form (a dict, or a JSON text); see the module docstring."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as exc:
            raise InputError(f"filter: not valid JSON ({exc})") from exc
    return _node(obj, "filter", 0, _Budget())


def _node(obj: Any, where: str, depth: int, budget: _Budget) -> Filter:
    if depth > MAX_DEPTH:
        raise InputError(f"{where}: filters nest at most {MAX_DEPTH} levels")
    budget.take(where)
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object (a condition or must/should/"
                         f"must_not), got {type(obj).__name__}")
    if "key" in obj:
        return _condition(obj, where)
    if any(k in obj for k in BOOL_KEYS):
        bad = sorted(set(obj) - set(BOOL_KEYS))
        if bad:
            raise InputError(f"{where}: unknown words {bad} beside must/should/must_not "
                             "(a group holds only those three)")
        parts: dict[str, tuple[Filter, ...]] = {}
        for k in BOOL_KEYS:
            v = obj.get(k)
            if v is None:
                continue
            seq = v if isinstance(v, list) else [v]
            parts[k] = tuple(_node(x, f"{where}.{k}[{n}]", depth + 1, budget)
                             for n, x in enumerate(seq))
        return Bool(**parts)
    return _shorthand(obj, where, budget)


def _field(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: 'key' must be a non-empty field name")
    if len(name) > MAX_FIELD:
        raise InputError(f"{where}: field name longer than {MAX_FIELD} characters")
    return name


def _scalar(v: Any, where: str) -> Scalar:
    if isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float)):
        if not math.isfinite(float(v)):
            raise InputError(f"{where}: {v!r} is not a finite number")
        return float(v)
    raise InputError(f"{where}: a value must be a string, a number or true/false; got "
                     f"{json.dumps(v)[:60] if _jsonable(v) else type(v).__name__}")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def _condition(obj: dict[str, Any], where: str) -> Filter:
    field = _field(obj["key"], where)
    ops = [k for k in COND_KEYS if k in obj]
    bad = sorted(set(obj) - {"key", *COND_KEYS})
    if bad:
        raise InputError(f"{where}: unknown words {bad} in a condition on {field!r} (a "
                         f"condition is key + one of {list(COND_KEYS)})")
    if len(ops) != 1:
        raise InputError(f"{where}: a condition on {field!r} needs exactly one of "
                         f"{list(COND_KEYS)}; got {ops or 'none'}")
    op, v = ops[0], obj[ops[0]]
    w = f"{where} ({field})"
    if op == "match":
        if isinstance(v, dict):  # {"value": V} / {"any": [...]}, as other engines write it
            if set(v) == {"value"}:
                return Match(field, _scalar(v["value"], w))
            if set(v) == {"any"}:
                return _any(field, v["any"], w)
            raise InputError(f"{w}: 'match' takes a value (or {{\"value\": V}} / "
                             "{\"any\": [...]}), not an object")
        return Match(field, _scalar(v, w))
    if op == "any":
        return _any(field, v, w)
    if op == "exists":
        if v is not True:
            raise InputError(f"{w}: 'exists' takes true (use must_not for a missing field)")
        return Exists(field)
    return _range(field, v, w)


def _any(field: str, v: Any, where: str) -> AnyOf:
    if not isinstance(v, list) or not v:
        raise InputError(f"{where}: 'any' takes a non-empty list of values")
    if len(v) > MAX_VALUES:
        raise InputError(f"{where}: 'any' takes at most {MAX_VALUES} values")
    return AnyOf(field, unique_values(_scalar(x, where) for x in v))


def _range(field: str, v: Any, where: str) -> Range:
    if not isinstance(v, dict) or not v:
        raise InputError(f"{where}: 'range' takes an object of bounds {list(RANGE_OPS)}")
    bad = sorted(set(v) - set(RANGE_OPS))
    if bad:
        raise InputError(f"{where}: unknown range bounds {bad}; use {list(RANGE_OPS)}")
    kinds = set()
    bounds: dict[str, float] = {}
    text: list[tuple[str, str]] = []
    for op, b in v.items():
        if isinstance(b, bool) or b is None:
            raise InputError(f"{where}: range bound {op} must be a number or an ISO date")
        if isinstance(b, (int, float)):
            if not math.isfinite(float(b)):
                raise InputError(f"{where}: range bound {op} is not finite")
            kinds.add(NUMBER)
            bounds[op] = float(b)
            text.append((op, str(b)))
        elif isinstance(b, str):
            d = parse_date(b)
            if d is None:
                raise InputError(f"{where}: range bound {op}={b!r} is neither a number nor an "
                                 "ISO date (2021-05-01, 2021-05-01T12:00:00Z)")
            kinds.add(DATE)
            bounds[op] = d
            text.append((op, b))
        else:
            raise InputError(f"{where}: range bound {op} must be a number or an ISO date")
    if len(kinds) > 1:
        raise InputError(f"{where}: a range mixes numbers and dates")
    kind = kinds.pop()
    return Range(field, kind, text=tuple(text) if kind == DATE else (), **bounds)


def _shorthand(obj: dict[str, Any], where: str, budget: _Budget) -> Filter:
    if not obj:
        return Bool()
    must: list[Filter] = []
    for field, v in obj.items():
        w = f"{where}.{field}"
        budget.take(w)
        field = _field(field, where)
        if isinstance(v, list):
            must.append(_any(field, v, w))
        elif isinstance(v, dict):
            if set(v) <= set(RANGE_OPS):
                must.append(_range(field, v, w))
            else:
                raise InputError(f"{w}: an object value must be a range ({list(RANGE_OPS)}); "
                                 "for other conditions use {\"key\": ..., ...}")
        else:
            must.append(Match(field, _scalar(v, w)))
    return must[0] if len(must) == 1 else Bool(must=tuple(must))


# -------------------------------------------------------------- compact form
_OP = re.compile(r"\s*(!=|>=|<=|=|>|<)\s*")
_FIELD = re.compile(r"[^\s=!<>]+")


def parse_where(texts: str | Sequence[str]) -> Filter:
    """A filter from compact ``--where`` expressions (all must hold); see the module
    docstring. An expression starting with ``{`` is the JSON form."""
    if isinstance(texts, str):
        texts = [texts]
    must: list[Filter] = []
    budget = _Budget()
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise InputError("--where: an empty expression")
        t = t.strip()
        if t.startswith("{"):
            must.append(parse_filter(t))
            continue
        alts = [a for a in re.split(r"\s+OR\s+", t)]
        parsed = [_compact(a, t, budget) for a in alts]
        must.append(parsed[0] if len(parsed) == 1 else Bool(should=tuple(parsed)))
    if len(must) == 1:
        return must[0]
    return Bool(must=tuple(must))


def _compact(text: str, whole: str, budget: _Budget) -> Filter:
    budget.take(whole)
    text = text.strip()
    m = _FIELD.match(text)
    if m is None:
        raise InputError(f"--where {whole!r}: expected FIELD OP VALUE (e.g. label=cat, "
                         "year>=2010)")
    field = m.group(0)
    o = _OP.match(text, m.end())
    if o is None:
        raise InputError(f"--where {whole!r}: no operator after {field!r}; use =, !=, >, >=, "
                         "<, <=")
    op, rest = o.group(1), text[o.end():].strip()
    if not rest:
        raise InputError(f"--where {whole!r}: no value after {field}{op}")
    where = f"--where {whole!r}"
    if op in ("=", "!="):
        if op == "=" and ".." in rest and not rest.startswith('"'):
            lo, _, hi = rest.partition("..")
            return _compact_range(field, {"gte": lo.strip(), "lte": hi.strip()}, where)
        values = _values(rest, where)
        cond: Filter = Match(field, values[0]) if len(values) == 1 else AnyOf(field, values)
        return Bool(must_not=(cond,)) if op == "!=" else cond
    key = {">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}[op]
    return _compact_range(field, {key: rest}, where)


def _values(text: str, where: str) -> tuple[Scalar | Literal, ...]:
    out: list[Scalar | Literal] = []
    pos = 0
    while pos <= len(text):
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == '"':
            try:
                val, end = json.JSONDecoder().raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: bad quoted value ({exc.msg})") from exc
            out.append(str(val))
            pos = end
            while pos < len(text) and text[pos] == " ":
                pos += 1
            if pos < len(text) and text[pos] != ",":
                raise InputError(f"{where}: expected ',' after a quoted value")
            pos += 1
            continue
        end = text.find(",", pos)
        end = len(text) if end < 0 else end
        raw = text[pos:end].strip()
        if not raw:
            raise InputError(f"{where}: an empty value in a list")
        out.append(Literal(raw))
        pos = end + 1
    if len(out) > MAX_VALUES:
        raise InputError(f"{where}: at most {MAX_VALUES} values")
    return unique_values(out)


def _compact_range(field: str, raw: dict[str, str], where: str) -> Range:
    conv: dict[str, Any] = {}
    for k, v in raw.items():
        if not v:
            raise InputError(f"{where}: a range needs both ends (lo..hi)")
        try:
            num = float(v)
        except ValueError:
            num = None
        if num is not None and math.isfinite(num):
            conv[k] = num
        elif parse_date(v) is not None:
            conv[k] = v
        else:
            raise InputError(f"{where}: {v!r} is neither a number nor an ISO date "
                             "(2021-05-01)")
    return _range(field, conv, where)
