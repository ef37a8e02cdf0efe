"""The plain local-feature baseline of issue 18: RootSIFT, FAISS flat, ratio test, votes.

Independent of galleria's local indexes on purpose (only the cached RootSIFT
features are shared, so both sides see the same keypoints): every gallery
descriptor goes into one exact ``IndexFlatL2``; each query descriptor takes its
2 nearest neighbours, keeps the first if ``d1 < ratio * d2`` (Lowe), and the
image owning it gets one vote. Score = votes (raw count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from galleria.local.features import float_descriptors
from galleria.types import LocalFeatures


def vote_scores(gallery: Sequence[LocalFeatures], queries: Sequence[LocalFeatures], *,
                ratio: float = 0.8, exclude: np.ndarray | None = None,
                batch: int = 4096) -> np.ndarray:
    """``(Q, G)`` float32 vote counts; ``exclude[q]`` (a gallery index or -1) is left out
    of query ``q``'s search (its descriptors are not in the index for that query)."""
    import faiss  # heavy optional dependency, loaded when the baseline runs

    x = np.concatenate([float_descriptors(f.descriptors) for f in gallery])
    owner = np.concatenate([np.full(len(f), i, np.int64) for i, f in enumerate(gallery)])
    start = np.r_[0, np.cumsum([len(f) for f in gallery])]
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    out = np.zeros((len(queries), len(gallery)), np.float32)
    for j, q in enumerate(queries):
        if not len(q):
            continue
        own = -1 if exclude is None else int(exclude[j])
        params = None
        if own >= 0:
            sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(start[own]), int(start[own + 1])))
            params = faiss.SearchParameters(sel=sel)
        qd = float_descriptors(q.descriptors)
        d2 = np.empty((len(qd), 2), np.float32)
        nn = np.empty((len(qd), 2), np.int64)
        for a in range(0, len(qd), batch):
            d2[a:a + batch], nn[a:a + batch] = flat.search(qd[a:a + batch], 2, params=params)
        d = np.sqrt(np.maximum(d2, 0))
        ok = (d[:, 0] < ratio * d[:, 1]) & (nn[:, 0] >= 0)
        out[j] = np.bincount(owner[nn[ok, 0]], minlength=len(gallery))
        if own >= 0:
            out[j, own] = -1
    return out
