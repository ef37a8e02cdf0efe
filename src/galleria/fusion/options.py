"""Option groups of the fusion package's public functions: a dataclass config, or its fields
given as keywords (so a call that named the options one by one keeps working)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from galleria.errors import InputError

T = TypeVar("T")


def options_of(cls: type[T], given: T | None, kw: dict[str, Any]) -> T:
    """``given`` with the fields named in ``kw`` replaced (``given`` is ``None``:
    ``cls(**kw)``).

    Raises:
        InputError: ``kw`` names a field ``cls`` does not have, or a required field is
            missing.
    """
    unknown = set(kw) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise InputError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
    try:
        return cls(**kw) if given is None else dataclasses.replace(given, **kw)  # type: ignore[type-var]
    except TypeError as exc:
        raise InputError(f"{cls.__name__}: {exc}") from exc
