"""Saved estimators: a folder holding ``header.json`` and a safetensors state file.

Fitted transforms (:mod:`galleria.transforms`) and cross-model maps
(:mod:`galleria.upgrade.crossmap`) are saved the same way:

- ``header.json``: ``{"type", "format_version", "kind", "params", "fingerprint",
  "state_file", ...}`` (the artifact header of :mod:`galleria.io.artifact`, plus
  whatever the estimator records: dimensions, its own fingerprint, info);
- the learned arrays in one safetensors file (no pickle), named by
  ``state_file``.

A save writes the state under a fresh name, then atomically replaces the
header that names it, then deletes the state file the previous header named: a
crash at any point leaves the previous complete save or the new one, never a
header paired with the wrong weights. Concurrent saves into one folder leave the
last header's state intact (at worst an unreferenced state file), and a load
that loses a race with a save re-reads the header (:func:`read_saved`). Folders
written before this module (state file ``state.safetensors``) load unchanged.

Loading checks the header's type, format version and kind, rebuilds the
estimator from its parameters (:func:`build`) and reads the state; each
estimator then checks its own digest over the state and the model
fingerprints (:func:`galleria.io.artifact.check_fingerprint`).
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from galleria.errors import FormatError
from galleria.io.artifact import load_header, make_header, save_header
from galleria.io.atomic import read_json, write_bytes

HEADER_FILE = "header.json"
STATE_FILE = "state.safetensors"
"""The state file name of saves made before unique names (still read)."""

_STATE_NAME = re.compile(r"state(-[0-9a-f]{12})?\.safetensors")

T = TypeVar("T")


def keyword_params(cls: type) -> list[str]:
    """The keyword-only parameters of ``cls.__init__`` (an estimator's parameters)."""
    sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    return [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def get_params(obj: Any) -> dict[str, Any]:
    """``{name: value}`` of the keyword-only constructor parameters (scikit-learn style)."""
    return {name: getattr(obj, name) for name in keyword_params(type(obj))}


def save_estimator(
    path: str | os.PathLike[str],
    *,
    type: str,
    format_version: int,
    kind: str,
    params: dict[str, Any],
    fingerprint: str | None,
    state: dict[str, np.ndarray],
    **extra: Any,
) -> Path:
    """Write ``state`` and the header into folder ``path`` (see the module docstring).

    Args:
        path: the folder (created if needed; a previous save there is replaced).
        type, format_version: the artifact type and the version of its layout.
        kind: which estimator (``"pca"``, ``"psi"`` ...); checked on load.
        params: JSON-able constructor parameters (rebuilt by :func:`build`).
        fingerprint: the model whose embeddings the estimator takes (or None).
        state: learned arrays, name -> array (any dtype safetensors takes).
        extra: more JSON-able header fields.

    Returns:
        The folder.
    """
    from safetensors.numpy import save as st_save  # lazy: safetensors

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    previous = _named_state(out)
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    state_file = f"state-{secrets.token_hex(6)}.safetensors"
    write_bytes(out / state_file, st_save(arrays))
    header = make_header(
        type=type, format_version=format_version, params=params, fingerprint=fingerprint,
        kind=kind, state_file=state_file, **extra,
    )
    try:
        save_header(out / HEADER_FILE, header)  # last: it names the new state
    except BaseException:
        (out / state_file).unlink(missing_ok=True)
        raise
    # Only the state the header named *before* this save goes: a concurrent save
    # that wrote its header after ours read it never loses the file it names.
    if previous is not None and previous != state_file:
        (out / previous).unlink(missing_ok=True)
    return out


def _named_state(folder: Path) -> str | None:
    """The state file the folder's current header names (None: no readable header)."""
    try:
        header = read_json(folder / HEADER_FILE)
    except (OSError, ValueError):
        return None
    name = header.get("state_file", STATE_FILE) if isinstance(header, dict) else None
    return str(name) if isinstance(name, str) and _STATE_NAME.fullmatch(name) else None


def read_saved(
    path: str | os.PathLike[str], *, type: str, format_version: int, kind: str | None = None,
    tries: int = 8,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(checked header, state arrays)`` of a saved estimator, read consistently.

    A save running at the same time replaces the header and then deletes the
    state file the old header named; a reader that lost that race re-reads the
    header (up to ``tries`` times) instead of failing.

    Raises:
        FormatError: as :func:`read_estimator_header` and :func:`load_state`.
    """
    p = Path(path)
    for attempt in range(tries):
        header = read_estimator_header(p, type=type, format_version=format_version, kind=kind)
        try:
            return header, load_state(p, header)
        except FormatError as exc:
            missing = isinstance(exc.__cause__, FileNotFoundError)
            if not missing or attempt == tries - 1 or _named_state(p) == header.get(
                    "state_file", STATE_FILE):
                raise
    raise AssertionError("unreachable")


def read_estimator_header(
    path: str | os.PathLike[str], *, type: str, format_version: int, kind: str | None = None
) -> dict[str, Any]:
    """The checked header of a saved estimator folder.

    Raises:
        FormatError: missing or unreadable header, another artifact type, an
            unsupported format version, or (when ``kind`` is given) another kind.
    """
    p = Path(path)
    header = load_header(p / HEADER_FILE, type=type, format_version=format_version)
    if kind and header.get("kind") != kind:
        raise FormatError(f"{p} holds a {header.get('kind')!r} {type}, not {kind!r}")
    if not isinstance(header.get("params"), dict):
        raise FormatError(f"{p / HEADER_FILE} has no 'params' object")
    return header


def load_state(path: str | os.PathLike[str], header: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of the state file the header names.

    Raises:
        FormatError: the file is missing, unreadable or not safetensors.
    """
    from safetensors import SafetensorError  # lazy: safetensors
    from safetensors.numpy import load_file  # lazy: safetensors

    p = Path(path)
    name = str(header.get("state_file", STATE_FILE))
    if Path(name).name != name:
        raise FormatError(f"{p / HEADER_FILE}: state_file {name!r} is not a file name")
    try:
        return load_file(str(p / name))
    except (OSError, SafetensorError) as exc:
        raise FormatError(f"{p}: cannot read the saved state {name!r}: {exc}") from exc


def build(cls: type[T], params: dict[str, Any], *, where: str | os.PathLike[str]) -> T:
    """``cls(**params)``; parameters that do not fit are a FormatError naming ``where``."""
    try:
        return cls(**params)
    except TypeError as exc:
        raise FormatError(f"{where}: parameters do not fit {cls.__name__}: {exc}") from exc
