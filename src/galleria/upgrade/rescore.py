"""Rescoring for a transform change: the old part searched, then scored in the new space.

A transform change's new vectors are ``T(base vector)``, and every item keeps
its base vector until ``finish``. So an item not yet transformed can be scored
in the *new* space at query time: a shortlist from the old space (items not
done), each shortlisted item's stored base vector transformed on the fly, its
score ``T(q) . T(base(x))``. Both parts are then scored in one space and merge
by raw score: no calibration, and the answers are the new space's from the
first query on, up to the old space's recall at the shortlist depth
(:data:`RESCORE_DEPTH`). When the old space *is* the base space, ``T(q)`` is
computed from the old query embedding: one forward pass per query.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from galleria.extractors.registry import resolve_path
from galleria.store.gallery import Gallery
from galleria.transforms.registry import load_transform
from galleria.types import SearchResult
from galleria.upgrade.state import UpgradeError, UpgradeState

RESCORE_DEPTH = 100
"""Old-part shortlist per query (at least 4 k)."""


class TransformRescorer:
    """``T`` of a transform change and the base vectors it applies to."""

    def __init__(self, gallery: Gallery, state: UpgradeState) -> None:
        if state.change != "transform":
            raise UpgradeError("rescoring needs a transform change")
        self.gallery = gallery
        self.base = str(state.extra["base_space"])
        self.transform = load_transform(
            resolve_path(str(state.extra["transform"]), str(gallery.path)), fingerprint=self.base)
        if self.transform.output_fingerprint != state.new_space:
            raise UpgradeError(f"the job's transform makes {self.transform.output_fingerprint!r},"
                               f" the job fills {state.new_space!r}")
        self.derives_queries = state.old_space == self.base

    def query(self, base_queries: np.ndarray) -> np.ndarray:
        """``(Q, D_base)`` base-model query embeddings -> ``(Q, D_new)`` ``T(q)``."""
        return self.transform.transform(base_queries, fingerprint=self.base).astype(np.float32)

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """``(n, D_new)`` ``T(stored base vector)`` of items."""
        keys = self.gallery.keys_of(list(ids))
        x = self.gallery.get_vectors(keys, space=self.base)
        return self.transform.transform(x, fingerprint=self.base).astype(np.float32)

    def rescore(self, shortlist: SearchResult, new_queries: np.ndarray) -> SearchResult:
        """The shortlist scored in the new space, best first (``None`` padding kept)."""
        flat = sorted({i for i in shortlist.ids.reshape(-1) if i is not None})
        out = SearchResult.empty(*shortlist.ids.shape, object_ids=True)
        if not flat:
            return out
        vec = dict(zip(flat, self.vectors(flat), strict=True))
        for r in range(len(shortlist)):
            ids = [i for i in shortlist.ids[r] if i is not None]
            if not ids:
                continue
            s = np.stack([vec[i] for i in ids]) @ new_queries[r]
            order = np.argsort(-s, kind="stable")
            out.scores[r, : len(ids)] = s[order]
            out.ids[r, : len(ids)] = np.asarray(ids, dtype=object)[order]
        return out

