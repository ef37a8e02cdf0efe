"""Conformance suite: every index backend against a brute-force numpy reference.

Exact backends must return the reference ids and scores (float tolerance; ties
may come in either order); approximate ones must reach a stated recall@10.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from galleria.errors import CompatibilityError, InputError
from galleria.index.exact import ExactIndex, VectorTable, inner_product_topk
from galleria.index.factory import create_index, load_index
from galleria.index.faiss_index import FaissIndex

DIM = 32
N = 2000
NQ = 60
K = 10
ATOL = 1e-5

# spec -> (params, exact?, min recall@10 against brute force)
BACKENDS = {
    "exact": ({}, True, 1.0),
    "exact-bf16": ({}, True, 1.0),
    "exact-int8": ({}, True, 1.0),
    "Flat": ({}, True, 1.0),
    "IVF16,Flat": ({"nprobe": 16}, True, 1.0),  # all lists probed: exhaustive
    "HNSW32": ({"ef_search": 64}, False, 0.95),
    "IVF16,PQ8": ({"nprobe": 16, "rescore": 10}, False, 0.95),
}
SPECS = list(BACKENDS)


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """One FAISS thread: tiny indexes train faster, and HNSW builds deterministically."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _clustered(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """Normalised points around random cluster centres (less trivial than isotropic noise)."""
    c = centers[rng.integers(0, centers.shape[0], n)]
    x = c + 0.35 * rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    centers = rng.standard_normal((40, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = _clustered(rng, N, centers)
    q = _clustered(rng, NQ, centers)
    keys = rng.choice(10**9, size=N, replace=False).astype(np.int64)
    return keys, x, q


def brute_force(q: np.ndarray, x: np.ndarray, keys: np.ndarray, k: int):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1).astype(np.float32), keys[order]


def make(spec: str, **extra) -> object:
    params, _, _ = BACKENDS[spec]
    return create_index(spec, DIM, **{**params, **extra})


def assert_exact(result, ref_s, ref_ids) -> None:
    k = ref_s.shape[1]
    np.testing.assert_allclose(result.scores[:, :k], ref_s, atol=ATOL)
    # ids must agree wherever the reference score is not tied with a neighbour
    gap_prev = np.diff(ref_s, axis=1, prepend=np.inf)
    gap_next = -np.diff(ref_s, axis=1, append=-np.inf)
    distinct = (np.abs(gap_prev) > ATOL) & (np.abs(gap_next) > ATOL)
    assert (result.ids[:, :k][distinct] == ref_ids[distinct]).all()


def recall(result_ids: np.ndarray, ref_ids: np.ndarray) -> float:
    pairs = zip(result_ids, ref_ids, strict=True)
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in pairs]
    return float(np.sum(hits)) / ref_ids.size


def check_against_reference(index, q, x, keys, k=K) -> None:
    _, exact, min_recall = BACKENDS[_spec(index)]
    res = index.search(q, k)
    assert res.scores.shape == res.ids.shape == (q.shape[0], k)
    assert res.scores.dtype == np.float32 and res.ids.dtype == np.int64
    ref_s, ref_ids = brute_force(q, x, keys, min(k, len(keys)))
    if exact:
        assert_exact(res, ref_s, ref_ids)
    else:
        assert recall(res.ids[:, : ref_ids.shape[1]], ref_ids) >= min_recall
        assert np.all(np.diff(res.scores, axis=1) <= 1e-6)  # best first
        assert np.isin(res.ids[res.ids >= 0], keys).all()


def _spec(index) -> str:
    return "exact" if isinstance(index, ExactIndex) else index.spec


# the threaded and copy tests: a few threads search one unmodified index at once
@pytest.mark.parametrize("spec", [*SPECS, "prefix"])
def test_concurrent_search_matches_brute_force(spec, data):
    import threading

    keys, x, q = data
    index = create_index("prefix", DIM) if spec == "prefix" else make(spec)
    index.add(keys, x)
    index.remove(keys[:7])  # tombstones too (HNSW)
    live_x, live_k = x[7:], keys[7:]
    ref_s, ref_ids = brute_force(q, live_x, live_k, K)
    exact = spec == "prefix" or BACKENDS[spec][1]
    expected = index.search(q, K)  # single-threaded answer of this index
    rng = np.random.default_rng(7)
    plans = [rng.integers(0, q.shape[0], size=(12, 2)) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(plans))

    def worker(plan: np.ndarray) -> None:
        try:
            start.wait(timeout=30)
            for i, j in plan:  # a mix of single queries and batches
                lo, hi = min(i, j), max(i, j) + 1
                res = index.search(q[lo:hi], K)
                np.testing.assert_array_equal(res.ids, expected.ids[lo:hi])
                np.testing.assert_allclose(res.scores, expected.scores[lo:hi], atol=ATOL)
                if spec == "prefix":
                    index.search(q[lo:hi], K, dim=16)  # fills the shared prefix cache
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a search thread hung"
    assert not errors, errors[0]
    if exact:
        assert_exact(expected, ref_s, ref_ids)
    else:
        assert recall(expected.ids, ref_ids) >= BACKENDS[spec][2]


@pytest.mark.parametrize("spec", [*SPECS, "prefix"])
def test_search_while_a_copy_is_modified(spec, data, monkeypatch):
    """What a store view does: readers search an index while a copy of it is taken,
    added to and removed from in another thread (the copy shares nothing mutable)."""
    import threading

    from galleria.index import compressed

    monkeypatch.setattr(compressed, "_SMALL_VALUES", 0)  # the compressed scan, not rows
    keys, x, q = data
    index = create_index("prefix", DIM) if spec == "prefix" else make(spec)
    index.add(keys[:1200], x[:1200])
    expected = index.search(q, K)
    errors: list[BaseException] = []
    stop = threading.Event()
    searches = [0]

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                lo = int(r.integers(0, q.shape[0]))
                hi = int(r.integers(lo + 1, q.shape[0] + 1))
                res = index.search(q[lo:hi], K)
                np.testing.assert_array_equal(res.ids, expected.ids[lo:hi])
                searches[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for step in range(3):
            dup = index.copy()
            a = 1200 + 250 * step
            dup.add(keys[a : a + 250], x[a : a + 250])
            dup.remove(keys[step * 100 : step * 100 + 100])
            live = np.r_[0 : step * 100, step * 100 + 100 : 1200, a : a + 250]
            check_against_reference(dup, q, x[live], keys[live])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a search thread hung"
    assert not errors, errors[0]
    assert searches[0] >= 3
    np.testing.assert_array_equal(index.search(q, K).ids, expected.ids)


@pytest.mark.parametrize("spec", [*SPECS, "prefix"])
def test_copy_is_independent(spec, data):
    keys, x, q = data
    index = create_index("prefix", DIM) if spec == "prefix" else make(spec)
    index.add(keys[:1500], x[:1500])
    index.generation = 3
    before = index.search(q, K)
    dup = index.copy()
    assert type(dup) is type(index) and dup.generation == 3 and len(dup) == 1500
    np.testing.assert_array_equal(dup.search(q, K).ids, before.ids)
    # change the copy: the original is untouched
    dup.remove(keys[:300])
    dup.add(keys[1500:], x[1500:])
    assert len(index) == 1500 and len(dup) == N - 300
    np.testing.assert_array_equal(index.search(q, K).ids, before.ids)
    assert not np.isin(dup.search(q, K).ids, keys[:300]).any()
    # and the other way round
    index.remove(keys[1000:1500])
    assert len(dup) == N - 300 and np.isin(keys[1000:1500], dup.keys()).all()


@pytest.mark.parametrize("spec", SPECS)
def test_search_matches_brute_force(spec, data):
    keys, x, q = data
    index = make(spec)
    index.add(keys, x)
    assert len(index) == N
    assert sorted(index.keys().tolist()) == sorted(keys.tolist())
    check_against_reference(index, q, x, keys)
    check_against_reference(index, q[:1], x, keys, k=1)  # single query, k=1
    one = index.search(q[0], K)  # a (D,) query is one query
    assert one.scores.shape == (1, K)


@pytest.mark.parametrize("spec", SPECS)
def test_add_remove_readd(spec, data):
    keys, x, q = data
    index = make(spec)
    index.add(keys[:1200], x[:1200])
    index.add(keys[1200:], x[1200:])  # a second batch
    gone = keys[::3]
    assert index.remove(np.concatenate([gone, [10**12]])) == gone.size  # unknown key ignored
    assert index.remove(gone[:5]) == 0  # already removed
    live = ~np.isin(keys, gone)
    assert len(index) == live.sum()
    res = index.search(q, K)
    assert not np.isin(res.ids, gone).any()
    check_against_reference(index, q, x[live], keys[live])
    # single-key removals in a loop, then re-add the removed keys with new vectors
    for key in keys[1:40:3]:
        index.remove(np.array([key]))
    live &= ~np.isin(keys, keys[1:40:3])
    readd = keys[~live][:100]
    newx = x[~live][:100][::-1].copy()  # different vectors for the same keys
    index.add(readd, newx)
    all_keys = np.concatenate([keys[live], readd])
    all_x = np.concatenate([x[live], newx])
    assert len(index) == all_keys.size
    check_against_reference(index, q, all_x, all_keys)
    # a re-added key is found by its new vector, not its old one
    r = index.search(newx[:5], 1)
    assert (r.ids[:, 0] == readd[:5]).all()


@pytest.mark.parametrize("spec", SPECS)
def test_padding_and_empty(spec, data):
    keys, x, q = data
    index = make(spec)
    empty = index.search(q[:3], 5)
    assert (empty.ids == -1).all() and np.isneginf(empty.scores).all()
    if isinstance(index, FaissIndex) and not index.is_trained:
        index.train(x)
    index.add(keys[:3], x[:3])
    res = index.search(q[:4], 5)
    assert res.ids.shape == (4, 5)
    assert (res.ids[:, 3:] == -1).all() and np.isneginf(res.scores[:, 3:]).all()
    assert (np.sort(res.ids[:, :3], axis=1) == np.sort(keys[:3])).all()
    index.remove(keys[:3])
    res = index.search(q[:2], 2)
    assert (res.ids == -1).all() and np.isneginf(res.scores).all()


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_round_trip(spec, data, tmp_path):
    keys, x, q = data
    index = make(spec, fingerprint="model@abc")
    index.add(keys, x)
    index.remove(keys[:50])
    index.generation = 7
    before = index.search(q, K)
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix", fingerprint="model@abc", dim=DIM)
    assert type(loaded) is type(index)
    assert loaded.params() == index.params()
    assert loaded.generation == 7 and loaded.fingerprint == "model@abc"
    assert len(loaded) == len(index)
    assert sorted(loaded.keys().tolist()) == sorted(index.keys().tolist())
    after = loaded.search(q, K)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores, atol=ATOL)
    # the loaded index stays updatable, and a second save replaces the first
    loaded.add(keys[:50], x[:50])
    loaded.save(tmp_path / "ix")
    again = load_index(tmp_path / "ix")
    assert len(again) == N
    header = json.loads((tmp_path / "ix" / "header.json").read_text())
    assert header["ntotal"] == N and header["dim"] == DIM and header["type"] == index.type_name
    # only the files the header names remain: the previous save's files were removed
    assert sorted(os.listdir(tmp_path / "ix")) == sorted(["header.json", *header["files"].values()])


@pytest.mark.parametrize("spec", SPECS)
def test_crash_during_save_keeps_old_index(spec, data, tmp_path, monkeypatch):
    keys, x, q = data
    index = make(spec)
    index.add(keys[:1000], x[:1000])
    index.save(tmp_path / "ix")
    files_before = sorted(os.listdir(tmp_path / "ix"))
    old = index.search(q, K)

    index.add(keys[1000:], x[1000:])
    real_save = np.save

    def crash(fh, arr, *a, **kw):  # write part of the file, then die
        real_save(fh, arr[: max(1, len(arr) // 2)], *a, **kw)
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError, match="simulated crash"):
        index.save(tmp_path / "ix")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "ix")) == files_before  # no partial or temp files
    loaded = load_index(tmp_path / "ix")
    assert len(loaded) == 1000
    np.testing.assert_array_equal(loaded.search(q, K).ids, old.ids)


@pytest.mark.parametrize("spec", SPECS)
def test_fingerprint_and_dim_mismatch(spec, data, tmp_path):
    keys, x, _ = data
    index = make(spec, fingerprint="effnet@1111")
    index.add(keys, x)
    index.save(tmp_path / "ix")
    with pytest.raises(CompatibilityError, match=r"effnet@2222.*effnet@1111"):
        load_index(tmp_path / "ix", fingerprint="effnet@2222")
    with pytest.raises(CompatibilityError, match=r"expected 64, got 32"):
        load_index(tmp_path / "ix", dim=64)


@pytest.mark.parametrize("spec", SPECS)
def test_input_validation(spec, data):
    keys, x, q = data
    index = make(spec)
    index.add(keys[:500], x[:500])
    bad = [
        (lambda: index.add(keys[500:510], x[500:510, :16]), "dimension 16, expected 32"),
        (lambda: index.add(keys[500:502], np.full((2, DIM), np.nan)), "NaN"),
        (lambda: index.add(keys[:0], x[:0]), "empty"),
        (lambda: index.add(keys[500:502].astype(float), x[500:502]), "integers"),
        (lambda: index.add(np.array(["a", "b"]), x[500:502]), "integers"),
        (lambda: index.add(np.array([7, 7]), x[500:502]), "duplicate"),
        (lambda: index.add(keys[:2], x[:2]), "already in the index"),
        (lambda: index.add(np.array([-3, 5]), x[500:502]), ">= 0"),
        (lambda: index.add(keys[500:503], x[500:502]), "3 keys for 2 vectors"),
        (lambda: index.search(q[:, :8], K), "dimension 8"),
        (lambda: index.search(np.full((1, DIM), np.inf), K), "NaN or inf"),
        (lambda: index.search(q[:0], K), "empty"),
        (lambda: index.search(q, 0), "positive integer"),
        (lambda: index.search(q, -1), "positive integer"),
        (lambda: index.search(q, 2.5), "positive integer"),
        (lambda: index.remove(np.array([1.5])), "integers"),
    ]
    for call, message in bad:
        with pytest.raises(InputError, match=message):
            call()
    assert len(index) == 500  # nothing half-added


def test_factory_and_errors(data, tmp_path):
    keys, x, _ = data
    assert isinstance(create_index("exact", DIM), ExactIndex)
    assert isinstance(create_index("HNSW32", DIM, ef_search=32), FaissIndex)
    with pytest.raises(InputError, match="invalid FAISS factory string"):
        create_index("NotAnIndex99", DIM)
    with pytest.raises(InputError, match="IDMap"):
        create_index("IDMap2,Flat", DIM)
    with pytest.raises(InputError, match="nprobe does not apply"):
        create_index("HNSW32", DIM, nprobe=4)
    with pytest.raises(InputError, match="unexpected keyword"):
        create_index("exact", DIM, nprobe=4)  # exact takes no nprobe
    with pytest.raises(InputError, match="dim"):
        create_index("exact", 0)
    with pytest.raises(InputError, match="at least 16 training vectors"):
        create_index("IVF16,Flat", DIM).add(keys[:10], x[:10])
    with pytest.raises(InputError, match="at least 256 training vectors"):
        create_index("IVF16,PQ8", DIM).train(x[:100])
    with pytest.raises(Exception, match="not a saved galleria index"):
        load_index(tmp_path / "nothing")


def test_hnsw_tombstones_then_rebuild(data):
    keys, x, q = data
    index = FaissIndex("HNSW32", DIM, ef_search=64, rebuild_fraction=0.3)
    index.add(keys, x)
    index.remove(keys[:100])
    assert index.tombstones == 100  # HNSW cannot delete: filtered by an IDSelector
    assert not np.isin(index.search(q, K).ids, keys[:100]).any()
    index.remove(keys[100:700])  # > 30 % dead: rebuilt from the live vectors
    assert index.tombstones == 0 and len(index) == N - 700
    check_against_reference(index, q, x[700:], keys[700:])


def test_exact_kernel_blocks_and_ties():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3001, 16)).astype(np.float32)
    q = rng.standard_normal((23, 16)).astype(np.float32)
    ref = q @ x.T
    for k in (1, 7, 300, 5000):
        for max_bytes in (4096 * 4, 1 << 16, 256 << 20):  # many query and gallery blocks
            s, r = inner_product_topk(q, x, k, max_batch_bytes=max_bytes)
            kk = min(k, 3001)
            want = np.sort(ref, axis=1)[:, ::-1][:, :kk]
            np.testing.assert_allclose(s, want, atol=1e-4)
            np.testing.assert_allclose(np.take_along_axis(ref, r, 1), s, atol=1e-4)
    for n in (1, 5, 700):  # small galleries take the unblocked path
        s, r = inner_product_topk(q, x[:n], 10)
        want = np.sort(ref[:, :n], axis=1)[:, ::-1][:, :10]
        np.testing.assert_allclose(s, want, atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(ref, r, 1), s, atol=1e-4)
    # duplicated vectors: both copies are returned with equal scores
    dup = np.concatenate([x[:10], x[:10]])
    s, r = inner_product_topk(q[:3], dup, 2)
    assert (np.sort(r, axis=1) % 10 == np.sort(r, axis=1)[:, :1] % 10).all()


def test_vector_table_swap_remove():
    rng = np.random.default_rng(2)
    table = VectorTable(4)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    table.add(np.arange(50), x)
    assert table.remove(np.array([0, 49, 10, 10, 99])) == 3
    for key in (5, 6, 7):
        table.remove(np.array([key]))
    live = [k for k in range(50) if k not in (0, 49, 10, 5, 6, 7)]
    assert sorted(table.keys.tolist()) == live
    rows = table.rows_of(np.array(live))
    np.testing.assert_array_equal(table.vectors[rows], x[live])
    assert table.rows_of(np.array([0, 5])).tolist() == [-1, -1]
