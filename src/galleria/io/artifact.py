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
        got = header.get("type") if isinstance(header, dict) else \
            f"{header.__class__.__name__} (not a JSON object)"
        raise FormatError(f"{p} holds a {got!r} artifact, expected {type!r}")
    version = header.get("format_version")
    if version != format_version:
        raise FormatError(
            f"{p} has format version {version}; this galleria reads version {format_version}"
        )
    return header


def check_fingerprint(expected: str | None, got: str | None, *, what: str) -> None:
    """Raise CompatibilityError naming both fingerprints when they differ."""
    if expected is not None and got is not None and expected != got:
        raise CompatibilityError(
            f"{what}: model fingerprint mismatch: expected {expected!r}, got {got!r}"
        )
