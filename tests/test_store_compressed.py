"""Compressed indexes inside the gallery store: re-scored against the segment files.

A gallery whose space uses ``exact-bf16`` / ``exact-int8`` must answer exactly
like ``exact`` through adds, removals, merges, saved snapshots and reopening,
with the float32 vectors read from the store's memory-mapped segments (no
second copy), and while readers search during commits. Seeded, bounded in time.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from galleria.index import compressed
from galleria.index.factory import create_index
from galleria.store import views
from galleria.store.gallery import Gallery
from galleria.store.source import ChainSource, SegmentSource

FP = "model-a@0000000000000001"
SPECS = ["exact-bf16", "exact-int8"]
K = 10
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _compressed_path(monkeypatch):
    monkeypatch.setattr(compressed, "_SMALL_VALUES", 0)


def clustered(seed: int, n: int, d: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((20, d)).astype(np.float32)
    x = c[rng.integers(0, 20, n)] / np.sqrt(d) + 0.2 * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_reference(g: Gallery, q: np.ndarray, k: int):
    """Top-k of the ``exact`` index over the gallery's current vectors (int64 keys)."""
    keys, v = g.load_vectors(FP)
    ref = create_index("exact", v.shape[1])
    ref.add(keys, v)
    return ref.search(q, k)


def assert_same(res, ref) -> None:
    k = ref.scores.shape[1]
    np.testing.assert_allclose(res.scores[:, :k], ref.scores, atol=ATOL)
    s = ref.scores.astype(np.float64)
    gap_prev = np.abs(np.diff(s, axis=1, prepend=np.inf))
    gap_next = np.abs(np.diff(s, axis=1, append=-np.inf))
    distinct = (gap_prev > ATOL) & (gap_next > ATOL)
    assert (res.ids[:, :k][distinct] == ref.ids[distinct]).all()


@pytest.mark.parametrize("spec", SPECS)
def test_store_rescores_against_its_segments_through_updates(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(views, "MERGE_MIN", 50)  # merges happen in this small test
    x = clustered(0, 1600)
    ids = [f"img/{i:04d}" for i in range(1600)]
    q = clustered(1, 25)
    g = Gallery.create(tmp_path / "g")
    g.add(ids[:1000], x[:1000], space=FP)
    g.set_index_spec(spec, FP)
    v = g.view(FP)
    assert v.spec == spec and isinstance(v.base.source, SegmentSource)
    assert not v.base.has_own_vectors  # float32 rows only in the store's files
    assert_same(v.search(q, K), exact_reference(g, q, K))

    # removals and adds: catch-up (tombstones + exact delta), then a merged base
    g.remove(ids[:40], space=FP)
    g.add(ids[1000:1100], x[1000:1100], space=FP)
    assert_same(g.view(FP).search(q, K), exact_reference(g, q, K))
    g.add(ids[1100:1400], x[1100:1400], space=FP)  # past MERGE_MIN: a new base
    v = g.view(FP)
    assert v.delta is None and len(v.base) == 1360
    assert isinstance(v.base.source, SegmentSource)
    assert_same(v.search(q, K), exact_reference(g, q, K))

    # a saved snapshot holds codes only; reopened, it is attached to the store again
    folder = g.save_index(FP)
    assert not list(folder.glob("vectors*"))
    # changed after the snapshot: a key removed, one re-added with another vector, new keys
    g.remove(ids[100:110], space=FP)
    g.add(ids[100:101], x[1500:1501], space=FP)
    g.add(ids[1400:1500], x[1400:1500], space=FP)
    g.close()
    g = Gallery.open(tmp_path / "g")
    v = g.view(FP)
    assert isinstance(v.base.source, SegmentSource) and not v.base.needs_source
    assert_same(v.search(q, K), exact_reference(g, q, K))
    hit = g.search(x[1500:1501], 1, space=FP)
    assert hit.ids[0, 0] in (ids[100], ids[1500])  # the same vector under two ids
    g.close()


def test_merge_outside_a_transaction_chains_the_delta():
    base = SegmentSource(4, np.array([1, 5, 9]), np.zeros(3, np.int64), np.arange(3),
                         [np.eye(4, dtype=np.float32)[:3]])
    chain = ChainSource(base, np.array([7, 3]), np.full((2, 4), 2.0, np.float32))
    got = chain.get(np.array([1, 3, 7, 9]))
    np.testing.assert_array_equal(got, [[1, 0, 0, 0], [2, 2, 2, 2], [2, 2, 2, 2],
                                        [0, 0, 1, 0]])
    with pytest.raises(Exception, match="no vector"):
        base.get(np.array([2]))


@pytest.mark.parametrize("spec", SPECS)
def test_readers_search_while_a_writer_commits(spec, tmp_path, monkeypatch):
    """Three threads search the gallery while the main thread adds (merged bases
    included); every answer equals exact search over the state it saw."""
    monkeypatch.setattr(views, "MERGE_MIN", 100)
    x = clustered(2, 1500)
    ids = [str(i) for i in range(1500)]
    q = clustered(3, 8)
    g = Gallery.create(tmp_path / "g")
    g.add(ids[:600], x[:600], space=FP)
    g.set_index_spec(spec, FP)
    errors: list[BaseException] = []
    stop = threading.Event()
    checked = [0]

    def read(seed: int) -> None:
        try:
            while not stop.is_set():
                v = g.view(FP)
                res = v.search(q, K)
                keys = v.keys()  # the state this view describes
                xs = x[np.array([int(i) for i in v.ids.lookup(keys)])]
                ref = create_index("exact", x.shape[1])
                ref.add(keys, xs)
                assert_same(res, ref.search(q, K))
                checked[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for a in range(600, 1500, 150):
            g.add(ids[a : a + 150], x[a : a + 150], space=FP)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert checked[0] >= 3
    assert_same(g.view(FP).search(q, K), exact_reference(g, q, K))
    g.close()


@pytest.mark.parametrize("spec", ["exact-int8"])
def test_cli_index_with_a_compressed_index(spec, tmp_path, require_shared, capsys):
    """`galleria index --index exact-int8` of 60 real SMVS covers (effnet-lite0): the
    gallery's index scores int8 codes, re-scores from the segment files, and answers
    like exact search for every image as a query; `galleria search` works on it."""
    import json

    from galleria.cli.main import main as cli

    smvs = require_shared("smvs_dvd_covers")
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(smvs.rglob("*.jpg"))[:60]:
        (src / p.name).symlink_to(p)
    out = tmp_path / "g"
    assert cli(["index", str(src), "--out", str(out), "--model", "effnet-lite0",
                "--index", spec, "-q"]) == 0
    capsys.readouterr()
    g = Gallery.open(out)
    fp = g.spaces()[0].space
    v = g.view(fp)
    assert v.spec == spec and isinstance(v.base.source, SegmentSource)
    keys, x = g.load_vectors(fp)
    ref = create_index("exact", x.shape[1])
    ref.add(keys, x)
    assert_same(v.search(x, K), ref.search(x, K))
    g.close()
    first = sorted(src.iterdir())[0]
    assert cli(["search", str(out), str(first), "-k", "3", "--json"]) == 0
    res = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert res[0]["results"][0]["id"] == first.name
