"""The gallery's state in one read: what every decision about a search is made from.

:func:`read_state` reads the spaces (kind, dimension, count, generation, index),
the primary space and the settings (an upgrade job, a finish in progress, the
tuned default...) in one SQLite read transaction, so a caller never mixes two
committed states. :class:`GalleryState` is immutable; the store knows nothing of
what the settings mean (``galleria.decision`` does).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SpaceState:
    """One space at one committed state (``info`` is the space's record)."""

    space: str
    kind: str
    dim: int
    count: int
    generation: int
    index_spec: str
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class GalleryState:
    """Spaces (in creation order), the primary space and the settings of a gallery."""

    path: Path
    spaces: tuple[SpaceState, ...]
    primary: str | None
    settings: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def space(self, name: str | None) -> SpaceState | None:
        """The space called ``name`` (``None`` when the gallery has no such space)."""
        for s in self.spaces:
            if s.space == name:
                return s
        return None

    def setting(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def of_kind(self, kind: str, *, non_empty: bool = True) -> list[SpaceState]:
        """Spaces holding ``kind`` data (``global`` / ``local``), with items unless told."""
        return [s for s in self.spaces if s.kind == kind and (s.count or not non_empty)]


def read_state(c: sqlite3.Connection, root: Path) -> GalleryState:
    """The state ``c``'s read transaction sees (call inside ``db.read()``)."""
    rows = c.execute("SELECT space, kind, dim, count, generation, index_spec, info "
                     "FROM spaces ORDER BY created").fetchall()
    spaces = tuple(SpaceState(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), str(r[5]),
                              json.loads(r[6])) for r in rows)
    settings = {k: json.loads(v) for k, v in c.execute("SELECT key, value FROM settings")}
    return GalleryState(Path(root), spaces, settings.get("primary_space"), settings)
