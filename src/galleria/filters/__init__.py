"""Payload filters: one language for the Python API, the CLI (``--where``) and HTTP.

::

    from galleria.filters import as_filter
    f = as_filter({"must": [{"key": "label", "match": "cat"},
                            {"key": "year", "range": {"gte": 2010}}]})
    f = as_filter(["label=cat", "year>=2010"])          # the compact CLI form
    gallery.search(q, 10, space=fp, where=f)            # exact filtered search
    gallery.count_items(where=f); gallery.list_items(where=f, limit=100)

Values and their types: :mod:`galleria.filters.values`; the tree:
:mod:`galleria.filters.model`; reading it: :mod:`galleria.filters.parse`;
checking it against a gallery's fields: :func:`bind`; the reference evaluator:
:func:`matches`. The store evaluates filters on its payload index
(:mod:`galleria.store.payloads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from galleria.errors import InputError
from galleria.filters.bind import Fields, bind, describe_fields
from galleria.filters.evaluate import matches
from galleria.filters.model import (
    AnyOf,
    Bool,
    Exists,
    Filter,
    Literal,
    Match,
    Range,
    cache_key,
    conditions,
    describe,
    is_empty,
    to_json,
)
from galleria.filters.parse import parse_filter, parse_where

FILTER_TYPES = (Match, AnyOf, Range, Exists, Bool)


def as_filter(obj: Any) -> Filter | None:
    """A filter from any accepted form: a :data:`Filter`, its JSON form (dict or text),
    or compact ``--where`` expressions (a list of strings); ``None`` stays ``None``."""
    if obj is None or isinstance(obj, FILTER_TYPES):
        return obj
    if isinstance(obj, dict):
        return parse_filter(obj)
    if isinstance(obj, str):
        return parse_filter(obj) if obj.strip().startswith("{") else parse_where(obj)
    if isinstance(obj, Sequence) and all(isinstance(x, str) for x in obj):
        return parse_where(list(obj)) if obj else None
    raise InputError(f"a filter is a JSON object, a JSON text or --where expressions; got "
                     f"{type(obj).__name__}")


__all__ = ["AnyOf", "Bool", "Exists", "Fields", "Filter", "Literal", "Match", "Range",
           "as_filter", "bind", "cache_key", "conditions", "describe", "describe_fields",
           "is_empty", "matches", "parse_filter", "parse_where", "to_json"]
