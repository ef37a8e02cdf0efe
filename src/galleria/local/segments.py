"""The inverted file of an ASMK index: immutable CSR segments (pure numpy).

Shapes: ``W`` visual words, ``E`` entries (one per aggregated word of an image),
``nw`` uint64 words per binary residual code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Immutable CSR inverted file: entries of word ``w`` are ``offsets[w]:offsets[w+1]``."""

    offsets: np.ndarray  # (W + 1,) int64
    rows: np.ndarray  # (E,) int32
    codes: np.ndarray  # (E, nw) uint64

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    def words(self) -> np.ndarray:
        return np.repeat(np.arange(self.offsets.size - 1, dtype=np.int64), np.diff(self.offsets))


def build_segment(words: np.ndarray, rows: np.ndarray, codes: np.ndarray, nwords: int) -> Segment:
    """A segment of entries ``(words[i], rows[i], codes[i])`` (``(E,)``, ``(E,)``,
    ``(E, nw)``), sorted by word then row."""
    order = np.lexsort((rows, words))
    w = words[order]
    offsets = np.zeros(nwords + 1, np.int64)
    np.cumsum(np.bincount(w, minlength=nwords), out=offsets[1:])
    return Segment(offsets, np.ascontiguousarray(rows[order], np.int32),
                   np.ascontiguousarray(codes[order]))


def merge_segments(segs: Sequence[Segment], alive: np.ndarray, nwords: int) -> Segment:
    """One segment of the entries of ``segs`` whose row is ``alive`` (``(rows,)`` bool)."""
    words = np.concatenate([s.words() for s in segs])
    rows = np.concatenate([s.rows for s in segs])
    codes = np.concatenate([s.codes for s in segs])
    keep = alive[rows]
    return build_segment(words[keep], rows[keep], codes[keep], nwords)
