"""One conformance check run over every searcher kind (tests/test_searcher_contract.py and
the sharded searcher in tests/test_ray.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from galleria.decision.choose import KINDS
from galleria.errors import CompatibilityError, InputError
from galleria.search.contract import Searcher, SearchOptions
from galleria.types import clamp_k


def assert_conforms(s: Any, images: list[Any], n_items: int, *, k: int = 5) -> None:
    """``s`` keeps the searcher contract on ``images`` over a gallery of ``n_items``."""
    assert isinstance(s, Searcher)
    d = s.describe()
    assert {"searcher", "pipeline", "model", "spaces", "reason"} <= set(d), d
    assert d["searcher"] == s.kind and s.kind in KINDS, d
    assert s.spaces and set(s.spaces) <= set(s.models), (s.spaces, list(s.models))
    assert set(s.read_spaces()) >= set(s.spaces)
    q = s.embed_images(images)
    assert set(q.data) == set(s.spaces) and len(q) == len(images)
    for kk in (1, k, n_items + 3):
        r = s.search(q, kk)
        assert r.scores.shape == r.ids.shape == (len(images), clamp_k(kk, n_items)), (kk, r)
        assert r.scores.dtype == np.float32 and r.ids.dtype == object
        for row_ids, row_scores in zip(r.ids, r.scores, strict=True):
            found = [i is not None for i in row_ids]
            assert all(isinstance(i, str) for i in row_ids if i is not None)
            assert found == sorted(found, reverse=True), row_ids  # padding only at the end
            sc = row_scores[np.array(found)]
            assert np.all(np.diff(sc) <= 1e-6), row_scores  # best first
            assert np.all(np.isneginf(row_scores[~np.array(found)]))
    again = s.search(q, k)
    first = s.search(q, k)
    assert np.array_equal(again.ids, first.ids) and np.array_equal(again.scores, first.scores)
    # options: honoured where supported, refused (not dropped) elsewhere
    if "qe" in s.supports:
        assert s.search(q, k, qe=1).ids.shape == first.ids.shape
        assert s.search(q, k, SearchOptions(qe=1)).ids.shape == first.ids.shape
    else:
        with pytest.raises(InputError, match="does not support"):
            s.search(q, k, qe=1)
    with pytest.raises(InputError, match="unknown search options"):
        s.search(q, k, bogus=1)
    with pytest.raises(InputError):
        s.search(q, 0)
    with pytest.raises(CompatibilityError):
        s.search({"no-such-space": np.zeros((1, 3), np.float32)}, k)
