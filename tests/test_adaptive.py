"""Prefix and funnel search over nested embeddings, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.index.adaptive import PrefixIndex, funnel_rescore, prefix
from galleria.index.factory import create_index, load_index
from galleria.store.gallery import Gallery
from galleria.validate import l2_normalize


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    # nested-like data: variance decays along the coordinates
    x = rng.standard_normal((500, 64)).astype(np.float32) * np.linspace(3, 0.2, 64)
    q = rng.standard_normal((7, 64)).astype(np.float32) * np.linspace(3, 0.2, 64)
    return l2_normalize(x.astype(np.float32)), l2_normalize(q.astype(np.float32))


def brute_prefix(q, x, d, k):
    s = prefix(q, d) @ prefix(x, d).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], np.sort(s, axis=1)[:, ::-1][:, :k]


@pytest.mark.parametrize("d", [8, 16, 64])
def test_prefix_search_matches_brute_force(data, d):
    x, q = data
    idx = create_index("prefix", 64)
    idx.add(np.arange(500) * 3, x)
    res = idx.search(q, 10, dim=d)
    rows, scores = brute_prefix(q, x, d, 10)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.ids, rows * 3)


def test_funnel_equals_brute_force_funnel(data):
    x, q = data
    idx = PrefixIndex(64, shortlist_dim=8, shortlist=50)
    idx.add(np.arange(500), x)
    res = idx.funnel_search(q, 5)
    cand, _ = brute_prefix(q, x, 8, 50)
    full = np.einsum("qd,qsd->qs", q, x[cand])
    order = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(res.ids, np.take_along_axis(cand, order, 1))
    # with a shortlist as large as the gallery, the funnel is exact full-size search
    exact = idx.search(q, 5)
    np.testing.assert_array_equal(idx.funnel_search(q, 5, shortlist=500).ids, exact.ids)
    s, _ = funnel_rescore(q, x, np.full((7, 3), -1), 2)
    assert np.isneginf(s).all()


def test_cache_invalidated_and_persisted(tmp_path, data):
    x, q = data
    idx = PrefixIndex(64, shortlist_dim=16, shortlist=40, fingerprint="m@1")
    idx.add(np.arange(400), x[:400])
    idx.search(q, 3, dim=16)
    idx.add(np.arange(400, 500), x[400:])
    rows, _ = brute_prefix(q, x, 16, 3)
    np.testing.assert_array_equal(idx.search(q, 3, dim=16).ids, rows)
    idx.remove(rows[:, 0])
    assert not np.isin(idx.search(q, 3, dim=16).ids, rows[:, 0]).any()
    idx.save(tmp_path / "i")
    back = load_index(tmp_path / "i", fingerprint="m@1")
    assert isinstance(back, PrefixIndex) and (back.shortlist_dim, back.shortlist) == (16, 40)
    np.testing.assert_array_equal(back.funnel_search(q, 4).ids, idx.funnel_search(q, 4).ids)
    with pytest.raises(InputError, match="prefix size"):
        idx.search(q, 3, dim=65)


def test_gallery_prefix_and_funnel(tmp_path, data):
    x, q = data
    g = Gallery.create(tmp_path / "g")
    g.add([f"{i}" for i in range(500)], x, space="nested@1")
    with pytest.raises(InputError, match="prefix"):
        g.search(q, 3, dim=8, space="nested@1")
    g.set_index_spec("prefix", "nested@1", shortlist_dim=8, shortlist=64)
    rows, _ = brute_prefix(q, x, 8, 3)
    sp = "nested@1"
    assert g.search(q, 3, dim=8, space=sp).ids.tolist() == [[str(r) for r in row] for row in rows]
    assert (g.search(q, 3, funnel=(8, 500), space=sp).ids.tolist()
            == g.search(q, 3, space=sp).ids.tolist())
    g.close()
