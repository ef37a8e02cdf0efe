"""Model fingerprints: which weights, preprocessing and pooling made a vector.

A fingerprint reads ``<name>@<digest>`` where digest is the first 16 hex digits
of a SHA-256 over the weight-file hash and the canonical JSON of the
preprocessing and pooling. Vectors, indexes and transforms record it; loading
checks it. A transform chains it: ``<model fp>|<transform name>@<digest>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: Any, length: int = 16) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else canonical_json(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:length]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, cached by (path, size, mtime)."""
    st = os.stat(path)
    return _file_sha256(os.fspath(os.path.abspath(path)), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_fingerprint(name: str, *parts: Any) -> str:
    return f"{name}@{digest(*parts)}"


def chain(parent: str, name: str, *parts: Any) -> str:
    """Fingerprint of a transform applied on top of ``parent``'s embeddings."""
    return f"{parent}|{name}@{digest(parent, *parts)}"


def slug(fingerprint: str) -> str:
    """A file-system-safe, short name for a fingerprint (used for folder names)."""
    head = fingerprint.split("@", 1)[0].split("|", 1)[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in head)[:40]
    return f"{safe}-{digest(fingerprint, length=12)}"
