"""Gallery store: ids, spaces, crash safety, index sync via the change log."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.store.gallery import Gallery
from galleria.validate import l2_normalize

FP_A = "model-a@0000000000000001"
FP_B = "model-b@0000000000000002"


def vecs(n, d=16, seed=0):
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))


def brute(q, x, ids, k):
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]


@pytest.fixture()
def gal(tmp_path):
    g = Gallery.create(tmp_path / "g")
    yield g
    g.close()


def test_add_search_matches_brute_force(gal):
    x = vecs(200)
    ids = [f"img/{i:03d}.jpg" for i in range(200)]
    gal.add(ids, x, space=FP_A)
    q = vecs(5, seed=1)
    res = gal.search(q, 7, fingerprint=FP_A)
    assert res.ids.shape == (5, 7) and res.ids.dtype == object
    assert res.ids.tolist() == brute(q, x, ids, 7)
    np.testing.assert_allclose(res.scores[:, 0], (q @ x.T).max(1), rtol=1e-5)


def test_ids_persist_and_resume(tmp_path):
    g = Gallery.create(tmp_path / "g")
    x = vecs(10)
    keys = g.add([f"{i}" for i in range(10)], x, space=FP_A, meta=[{"n": i} for i in range(10)])
    g.close()
    g = Gallery.open(tmp_path / "g")
    assert len(g) == 10 and g.count(FP_A) == 10
    assert g.has(["3", "x"], FP_A).tolist() == [True, False]
    assert g.keys_of(["3"]).tolist() == [keys[3]]
    assert g.meta(["4"]) == [{"n": 4}]
    np.testing.assert_array_equal(g.get_vectors(keys[[2, 5]], space=FP_A), x[[2, 5]])
    with pytest.raises(InputError, match="already have a vector"):
        g.add(["3"], x[:1], space=FP_A)
    g.add(["3"], x[4:5], space=FP_A, replace=True)
    np.testing.assert_array_equal(g.get_vectors(keys[[3]], space=FP_A), x[4:5])
    g.close()


def test_wrong_dimension_and_fingerprint_are_named(gal):
    gal.add(["a", "b"], vecs(2, 16), space=FP_A)
    with pytest.raises(CompatibilityError) as ei:
        gal.search(vecs(1, 8), 1, fingerprint=FP_A)
    assert "8" in str(ei.value) and "16" in str(ei.value)
    with pytest.raises(CompatibilityError) as ei:
        gal.search(vecs(1, 16), 1, space=FP_A, fingerprint=FP_B)
    assert FP_A in str(ei.value) and FP_B in str(ei.value)
    with pytest.raises(CompatibilityError, match="dimension"):
        gal.add(["c"], vecs(1, 8), space=FP_A)
    with pytest.raises(InputError, match="NaN"):
        gal.add(["d"], np.full((1, 16), np.nan, np.float32), space=FP_A)


def test_two_spaces_and_moves(gal):
    ids = [str(i) for i in range(20)]
    gal.add(ids, vecs(20, 16), space=FP_A)
    assert gal.primary_space == FP_A
    # move the first 5 items to space B in one transaction
    gal.add(ids[:5], vecs(5, 32, seed=3), space=FP_B, drop_spaces=[FP_A])
    assert gal.count(FP_A) == 15 and gal.count(FP_B) == 5 and len(gal) == 20
    assert set(gal.ids(FP_A)).isdisjoint(gal.ids(FP_B))
    res = gal.search(vecs(1, 32, seed=3)[:1], 3, space=FP_B)
    assert set(res.ids[0]) <= set(ids[:5])
    assert {s.space: s.count for s in gal.spaces()} == {FP_A: 15, FP_B: 5}


def test_remove_updates_index_incrementally(gal):
    x = vecs(50)
    ids = [str(i) for i in range(50)]
    gal.add(ids, x, space=FP_A)
    gal.save_index(FP_A)
    assert gal.remove(["3", "7", "nope"]) == 2
    res = gal.search(x[[3, 7]], 1, space=FP_A)
    assert "3" not in res.ids and "7" not in res.ids
    gal.add(["new"], x[3:4], space=FP_A)
    assert gal.search(x[3:4], 1, space=FP_A).ids[0, 0] == "new"
    assert len(gal) == 49


def test_saved_index_catches_up_after_reopen(tmp_path):
    g = Gallery.create(tmp_path / "g")
    x = vecs(30)
    g.add([str(i) for i in range(20)], x[:20], space=FP_A)
    g.save_index(FP_A)
    g.add([str(i) for i in range(20, 30)], x[20:], space=FP_A)  # index not saved again
    g.close()
    g = Gallery.open(tmp_path / "g")
    assert g.search(x[25:26], 1, space=FP_A).ids[0, 0] == "25"
    assert len(g.index(FP_A)) == 30
    g.close()


def test_crash_between_array_write_and_commit_leaves_store_consistent(gal, monkeypatch):
    gal.add(["a"], vecs(1), space=FP_A)

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    import galleria.store.writes as writes

    monkeypatch.setattr(writes, "_upsert_items", boom)
    with pytest.raises(RuntimeError):
        gal.add(["b"], vecs(1, seed=2), space=FP_A)
    monkeypatch.undo()
    assert gal.ids() == ["a"] and gal.count(FP_A) == 1
    # an orphaned array (as kill -9 would leave) is removed by compact
    (gal.path / "segments" / "x").mkdir(parents=True)
    (gal.path / "segments" / "x" / "orphan.npy").write_bytes(b"junk")
    assert gal.compact(orphan_age_s=0) >= 1
    assert not (gal.path / "segments" / "x" / "orphan.npy").exists()


def test_compaction_preserves_vectors(gal, monkeypatch):
    import galleria.store.writes as mod

    monkeypatch.setattr(mod, "COMPACT_SEGMENTS", 3)
    x = vecs(40)
    for i in range(10):
        gal.add([str(4 * i + j) for j in range(4)], x[4 * i : 4 * i + 4], space=FP_A)
    n = gal.db.one("SELECT COUNT(*) FROM segments")[0]
    assert n <= 4
    keys, v = gal.load_vectors(FP_A)
    order = np.argsort([int(i) for i in gal.ids_of(keys)])
    np.testing.assert_array_equal(v[order], x)


def test_not_a_gallery(tmp_path):
    with pytest.raises(FormatError, match="not a galleria gallery"):
        Gallery.open(tmp_path)
    Gallery.create(tmp_path / "g").close()
    with pytest.raises(InputError, match="already holds"):
        Gallery.create(tmp_path / "g")
    (tmp_path / "g" / "gallery.json").write_text('{"type": "gallery", "format_version": 99}')
    with pytest.raises(FormatError, match="format version"):
        Gallery.open(tmp_path / "g")


def test_faiss_index_spec(gal):
    x = vecs(300, 16)
    gal.add([str(i) for i in range(300)], x, space=FP_A)
    gal.set_index_spec("HNSW16", FP_A)
    res = gal.search(x[:10], 1, space=FP_A)
    assert [r[0] for r in res.ids] == [str(i) for i in range(10)]
    gal.save_index(FP_A)
    assert gal.index_spec(FP_A) == "HNSW16"
