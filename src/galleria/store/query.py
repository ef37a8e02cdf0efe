"""Search of one global space of a gallery by query vectors (:meth:`Gallery.search`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from galleria.errors import CompatibilityError, InputError
from galleria.index.base import check_k
from galleria.store import filtered
from galleria.types import SearchResult, clamp_k
from galleria.validate import as_embeddings

if TYPE_CHECKING:
    from galleria.store.gallery import Gallery


def search(g: Gallery, queries: np.ndarray, k: int = 10, *, fingerprint: str | None = None,
           space: str | None = None, dim: int | None = None,
           funnel: tuple[int, int] | None = None, where: Any = None) -> SearchResult:
    """Top-``k`` items for ``(Q, D)`` query vectors made by model ``fingerprint``.

    The caller names the model that made the queries (``fingerprint``) or the
    space they belong to (``space``); when both are given they must agree (a
    CompatibilityError names both otherwise), so vectors of another model are
    never compared. ``k`` is clamped to the space's size (the result has
    ``min(k, items)`` columns).
    ``dim`` / ``funnel=(shortlist_dim, shortlist)``: adaptive-size search on a
    ``prefix`` index. ``where``: only items satisfying this payload filter
    (store/filtered.py: exact; pre- or post-filter by how many match). Returns
    string ids (``None`` for missing results).
    """
    k = check_k(k)
    if fingerprint is None and space is None:
        raise InputError("name the model that made the query vectors (fingerprint=...) or "
                         f"the space to search (space=...); {g.path} has "
                         f"{[sp.space for sp in g.spaces()]}")
    space = space if space is not None else fingerprint
    fingerprint = fingerprint if fingerprint is not None else space
    if fingerprint != space:
        raise CompatibilityError(
            f"query vectors come from model {fingerprint!r} but the gallery space "
            f"searched holds vectors of {space!r}")
    view = g.view(space)
    if view.kind != "global":
        raise InputError(f"space {space!r} holds local features; search it with a "
                         "local pipeline (galleria.search)")
    q = np.asarray(queries)
    got = q.shape[-1] if q.ndim in (1, 2) else None
    if got != view.dim:
        raise CompatibilityError(
            f"query vectors have dimension {got} but space {space!r} holds vectors "
            f"of dimension {view.dim}")
    q = as_embeddings(q, name="queries", dim=view.dim)
    if where is not None:
        if dim is not None or funnel is not None:
            raise InputError("a filter (where) does not combine with dim / funnel search")
        return filtered.search_filtered(g, q, k, space=space, where=where)[0]
    if (dim is not None or funnel is not None) and not hasattr(view.base, "funnel_search"):
        raise InputError(
            f"the index of {space!r} is {view.spec!r}; prefix and funnel search need a "
            "'prefix' index (galleria index ... --index prefix)")
    # k is clamped to the space: a result has min(k, items) columns (k = 1e9 allocates
    # nothing extra)
    return view.search_ids(q, clamp_k(k, view.count), dim=dim, funnel=funnel)
