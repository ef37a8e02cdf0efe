"""Artifact headers: every file galleria writes records what made it.

A header is a JSON object ``{"type", "format_version", "params", "fingerprint", ...}``.
:func:`check_header` refuses an artifact of the wrong type, an unsupported format
version, or one made by another model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from galleria.errors import CompatibilityError, FormatError
from galleria.io.atomic import read_json, write_json


def make_header(
    *, type: str, format_version: int, params: dict[str, Any], fingerprint: str | None, **extra: Any
) -> dict[str, Any]:
    return {
        "type": type,
        "format_version": int(format_version),
        "params": dict(params),
        "fingerprint": fingerprint,
        **extra,
    }


def save_header(path: str | os.PathLike[str], header: dict[str, Any]) -> None:
    write_json(path, header)


def load_header(
    path: str | os.PathLike[str], *, type: str, format_version: int
) -> dict[str, Any]:
    """Read and check a header file: its ``type`` and ``format_version`` must match."""
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{p} is missing: not a galleria {type} artifact")
    try:
        header = read_json(p)
    except ValueError as exc:
        raise FormatError(f"{p} is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("type") != type:
        # (``type`` is the parameter here: name the JSON value's class another way)
        got = header.get("type") if isinstance(header, dict) else header.__class__.__name__
        raise FormatError(f"{p} holds a {got!r} artifact, expected {type!r}")
    version = header.get("format_version")
    if version != format_version:
        raise FormatError(
            f"{p} has format version {version}; this galleria reads version {format_version}"
        )
    return header


def check_fingerprint(expected: str | None, got: str | None, *, what: str) -> None:
    """Refuse an artifact made for another model.

    ``expected`` is the fingerprint the caller's data comes from; ``None`` means
    the caller does not know it, and nothing is checked. ``got`` is what the
    artifact recorded. When a fingerprint is expected the artifact must record
    the same one: a different one, or none at all (an artifact made without a
    fingerprint cannot vouch for any model), is a CompatibilityError naming both.
    """
    if expected is None or expected == got:
        return
    if got is None:
        raise CompatibilityError(
            f"{what}: records no model fingerprint (None), expected {expected!r}; it was made "
            "without one, so it cannot be checked against the model (re-create it with "
            "the model's fingerprint)"
        )
    raise CompatibilityError(
        f"{what}: model fingerprint mismatch: expected {expected!r}, got {got!r}"
    )
