"""Pseudo-queries: seeded sample and views, and the scores of a ranking against them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from galleria.errors import InputError
from galleria.images.pseudo import (
    make_pseudo_queries,
    make_views,
    pseudo_scores,
    rank_of_truth,
    sample_ids,
)
from galleria.store.gallery import Gallery
from galleria.types import SearchResult


def test_sample_is_seeded_and_order_free():
    ids = [f"i{n:03d}" for n in range(100)]
    a = sample_ids(ids, 10, seed=3)
    assert a == sample_ids(list(reversed(ids)), 10, seed=3)
    assert a != sample_ids(ids, 10, seed=4)
    assert len(set(a)) == 10 and set(a) <= set(ids)
    assert sample_ids(ids[:5], 10, seed=3) == ids[:5]
    with pytest.raises(InputError):
        sample_ids(ids, 0, seed=0)


def test_views_are_fixed_by_seed_and_differ_from_the_source():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    a = make_views([("x", img)], seed=1, views=2)
    b = make_views([("x", img)], seed=1, views=2)
    c = make_views([("x", img)], seed=2, views=1)
    assert a.ids == ["x", "x"] and a.fingerprint == b.fingerprint != c.fingerprint
    for u, v in zip(a.images, b.images, strict=True):
        assert np.array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(a.images[1]))
    assert max(a.images[0].size) <= 160


def test_gallery_sample_skips_unreadable_images(tmp_path):
    g = Gallery.create(tmp_path / "g")
    paths = []
    for n in range(6):
        p = tmp_path / f"{n}.png"
        Image.fromarray(np.full((40, 40, 3), 40 * n, np.uint8)).save(p)
        paths.append(str(p))
    paths[2] = str(tmp_path / "gone.png")
    vecs = np.eye(6, 8, dtype=np.float32)
    g.add([f"i{n}" for n in range(6)], vecs, space="m", meta=[{"path": p} for p in paths])
    pq = make_pseudo_queries(g, n=10, seed=0)
    assert sorted(set(pq.ids)) == ["i0", "i1", "i3", "i4", "i5"]
    assert [s[0] for s in pq.skipped] == ["i2"]


def test_scores_against_a_known_ranking():
    ids = np.array([["a", "b", None], ["c", "b", "a"], ["x", "y", "z"]], dtype=object)
    res = SearchResult(np.zeros((3, 3), np.float32), ids)
    assert rank_of_truth(res, ["a", "a", "a"]).tolist() == [0, 2, -1]
    s = pseudo_scores(res, ["a", "a", "a"])
    assert s["r1"] == pytest.approx(100 / 3) and s["r10"] == pytest.approx(200 / 3)
    assert s["mrr"] == pytest.approx(100 * (1 + 1 / 3) / 3)
