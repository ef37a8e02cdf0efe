"""exact-bf16 / exact-int8: exact results from compressed codes (seeded synthetic data).

The error bound of each codec is checked against the real GEMM output; the
indexes are compared with brute force and with ``exact`` through adds, removals,
save/load, copies, an attached vector source and concurrent searches.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.index import compressed
from galleria.index.codecs import CODECS
from galleria.index.compressed import NoVectorSourceError
from galleria.index.factory import create_index, load_index
from galleria.index.vectors import ArraySource, VectorSource

SPECS = ["exact-bf16", "exact-int8"]
K = 10
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _compressed_path(monkeypatch):
    """Always take the compressed path (small galleries otherwise scan the float32 rows)."""
    monkeypatch.setattr(compressed, "_SMALL_VALUES", 0)


def clustered(rng: np.random.Generator, n: int, d: int, centers: int = 30,
              noise: float = 0.15) -> np.ndarray:
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(q: np.ndarray, x: np.ndarray, keys: np.ndarray, k: int):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    o = np.lexsort((np.broadcast_to(keys, s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, o, 1).astype(np.float32), keys[o]


def assert_same(res, ref_s, ref_ids) -> None:
    k = ref_s.shape[1]
    np.testing.assert_allclose(res.scores[:, :k], ref_s, atol=ATOL)
    gap_prev = np.diff(ref_s, axis=1, prepend=np.inf)
    gap_next = -np.diff(ref_s, axis=1, append=-np.inf)
    distinct = (np.abs(gap_prev) > ATOL) & (np.abs(gap_next) > ATOL)
    assert (res.ids[:, :k][distinct] == ref_ids[distinct]).all()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(2024)
    x = clustered(rng, 3000, 48)
    q = clustered(rng, 40, 48)
    keys = rng.choice(10**9, size=3000, replace=False).astype(np.int64)
    return keys, x, q


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("d", [24, 1280])
def test_codec_bound_holds_on_the_real_gemm(codec, d):
    """|q.x - s_hat| <= eps for every pair, with s_hat from the torch GEMM itself."""
    rng = np.random.default_rng(d)
    noise = rng.standard_normal((100, d)).astype(np.float32)
    x = np.concatenate([clustered(rng, 900, d), noise / np.linalg.norm(noise, axis=1)[:, None]])
    x[-3:] = 0.0
    x[-2, 0] = 1.0
    q = clustered(rng, 33, d)
    c = CODECS[codec](d)
    codes, rnorm, cnorm = c.encode(x)
    qc = c.queries(q)
    g = c.gallery_tensor(codes)
    z = np.empty((q.shape[0], x.shape[0]), c.score_dtype)
    c.fill(g, qc.codes, 0, x.shape[0], z)
    zf = z.astype(np.float64)  # (Q, N)
    shat = qc.a[:, None] * zf + qc.b[:, None]
    eps = (qc.e_x[:, None] * rnorm[None, :] + qc.e_c[:, None] * cnorm[None, :]
           + qc.e_z[:, None] * np.abs(zf) + 1e-12)
    true = q.astype(np.float64) @ x.astype(np.float64).T
    err = np.abs(true - shat)
    assert (err <= eps).all(), f"bound violated by {float((err - eps).max()):.3g}"
    assert float(eps.mean()) < (0.02 if codec == "bf16" else 0.1)  # a useful bound
    dec = c.decode(codes)
    np.testing.assert_allclose(np.linalg.norm(x - dec, axis=1), rnorm, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("spec", SPECS)
def test_matches_brute_force(spec, data):
    keys, x, q = data
    index = create_index(spec, x.shape[1])
    index.add(keys, x)
    for k in (1, K, 200):
        ref_s, ref_ids = brute(q, x, keys, k)
        assert_same(index.search(q, k), ref_s, ref_ids)
    one = index.search(q[3], K)  # one query
    assert_same(one, *brute(q[3:4], x, keys, K))
    small = create_index(spec, x.shape[1])
    small.add(keys[:5], x[:5])
    res = small.search(q, 8)  # k > N: padded
    assert (res.ids[:, 5:] == -1).all() and np.isneginf(res.scores[:, 5:]).all()
    assert_same(res, *brute(q, x[:5], keys[:5], 5))


@pytest.mark.parametrize("spec", SPECS)
def test_identical_to_exact_through_updates(spec, data):
    keys, x, q = data
    a, b = create_index("exact", x.shape[1]), create_index(spec, x.shape[1])
    rng = np.random.default_rng(3)
    steps = [("add", keys[:1000], x[:1000]), ("add", keys[1000:], x[1000:]),
             ("remove", keys[::4], None), ("remove", keys[5:60:7], None),
             ("add", keys[::4][:300], clustered(rng, 300, x.shape[1])),
             ("remove", rng.choice(keys, 500, replace=False), None)]
    for op, k_, v in steps:
        if op == "add":
            a.add(k_, v)
            b.add(k_, v)
        else:
            assert a.remove(k_) == b.remove(k_)
        assert sorted(a.keys().tolist()) == sorted(b.keys().tolist())
        ra, rb = a.search(q, K), b.search(q, K)
        assert_same(rb, ra.scores, ra.ids)


@pytest.mark.parametrize("spec", SPECS)
def test_ties_are_ordered_by_key(spec):
    rng = np.random.default_rng(9)
    base = clustered(rng, 20, 32)
    x = np.repeat(base, 5, axis=0)  # every vector five times
    keys = rng.permutation(10**6)[: x.shape[0]].astype(np.int64)
    index = create_index(spec, 32)
    index.add(keys, x)
    res = index.search(base[:6], 5)
    for i in range(6):
        assert (res.ids[i] == np.sort(keys[i * 5 : i * 5 + 5])).all()
        assert np.ptp(res.scores[i]) == 0.0


@pytest.mark.parametrize("spec", SPECS)
def test_candidate_cap_falls_back_to_exact_scan(spec):
    """Thousands of equal scores overflow the candidate cap: still the exact answer."""
    rng = np.random.default_rng(4)
    x = np.repeat(clustered(rng, 2, 16), 2500, axis=0)
    x[::97] = clustered(rng, x[::97].shape[0], 16)
    keys = np.arange(x.shape[0], dtype=np.int64)
    index = create_index(spec, 16, max_batch_bytes=4096)  # a tiny cap
    index.add(keys, x)
    q = x[:3] + 1e-3
    assert_same(index.search(q, K), *brute(q, x, keys, K))


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_round_trip_and_checks(spec, data, tmp_path):
    keys, x, q = data
    os.makedirs(tmp_path / "scratch")
    index = create_index(spec, x.shape[1], fingerprint="m@1", scratch_dir=tmp_path / "scratch")
    index.add(keys, x)
    assert os.listdir(tmp_path / "scratch") == []  # the owned file is unlinked once mapped
    index.remove(keys[:100])
    before = index.search(q, K)
    index.save(tmp_path / "ix")
    header = json.loads((tmp_path / "ix" / "header.json").read_text())
    assert header["type"] == spec and header["vectors"] == "own"
    saved = {f: (tmp_path / "ix" / f).read_bytes() for f in header["files"].values()}
    loaded = load_index(tmp_path / "ix", fingerprint="m@1", dim=x.shape[1])
    assert type(loaded) is type(index) and len(loaded) == len(index)
    after = loaded.search(q, K)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores, atol=ATOL)
    # changing the loaded index copies its mapped vectors first: the saved files stay
    loaded.remove(keys[100:300])
    loaded.add(keys[:100], x[:100])
    assert all((tmp_path / "ix" / f).read_bytes() == b for f, b in saved.items())
    live = ~np.isin(keys, keys[100:300])
    assert_same(loaded.search(q, K), *brute(q, x[live], keys[live], K))
    with pytest.raises(CompatibilityError, match="m@2"):
        load_index(tmp_path / "ix", fingerprint="m@2")
    with pytest.raises(CompatibilityError, match="expected 7"):
        load_index(tmp_path / "ix", dim=7)
    # a damaged file is refused with a clear error
    codes = tmp_path / "ix" / header["files"]["codes"]
    codes.write_bytes(codes.read_bytes()[:-100])
    with pytest.raises(FormatError):
        load_index(tmp_path / "ix")
    codes.write_bytes(saved[codes.name])
    bad = dict(header, bound={"rnorm_max": -1.0, "cnorm_max": 1.0})
    (tmp_path / "ix" / "header.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="bound"):
        load_index(tmp_path / "ix")
    (tmp_path / "ix" / "header.json").write_text(json.dumps(header))
    load_index(tmp_path / "ix")  # restored: loads again
    (tmp_path / "ix" / header["files"]["vectors"]).unlink()
    with pytest.raises(FormatError, match="missing data file"):
        load_index(tmp_path / "ix")


class RecordingSource:
    """An ArraySource that records each get() (the store's role)."""

    def __init__(self, keys, x):
        self.inner = ArraySource(keys, x)
        self.dim = x.shape[1]
        self.calls: list[np.ndarray] = []
        self.lock = threading.Lock()

    def get(self, keys):
        with self.lock:
            self.calls.append(keys.copy())
        return self.inner.get(keys)


@pytest.mark.parametrize("spec", SPECS)
def test_vector_source(spec, data, tmp_path):
    keys, x, q = data
    src = RecordingSource(keys, x)
    assert isinstance(src, VectorSource)
    index = create_index(spec, x.shape[1], source=src)
    index.add(keys, x)
    assert not index.has_own_vectors
    assert_same(index.search(q, K), *brute(q, x, keys, K))
    assert src.calls and all((np.diff(c) > 0).all() for c in src.calls)  # sorted, unique
    fetched = sum(c.size for c in src.calls)
    assert fetched < keys.size  # only the short lists were read
    index.save(tmp_path / "ix")
    header = json.loads((tmp_path / "ix" / "header.json").read_text())
    assert header["vectors"] == "source" and "vectors" not in header["files"]
    bare = load_index(tmp_path / "ix")
    with pytest.raises(NoVectorSourceError, match="attach_source"):
        bare.search(q, K)
    bare.attach_source(src)
    assert_same(bare.search(q, K), *brute(q, x, keys, K))
    with pytest.raises(InputError, match="dim"):
        bare.attach_source(ArraySource(keys[:3], x[:3, :8]))
    with_src = type(index).load(tmp_path / "ix", source=src)
    assert_same(with_src.search(q[:2], K), *brute(q[:2], x, keys, K))


@pytest.mark.parametrize("spec", SPECS)
def test_copy_is_deep(spec, data):
    keys, x, q = data
    empty = create_index(spec, x.shape[1])
    twin = empty.copy()
    twin.add(keys[:2000], 0.5 * x[:2000] + 0.5 * x[1000:3000][::-1])  # fits its own codec
    empty.add(keys[:2000], x[:2000])
    assert_same(empty.search(q, K), *brute(q, x[:2000], keys[:2000], K))
    dup = empty.copy()
    dup.remove(keys[:1000])
    dup.add(keys[2000:], x[2000:])
    assert_same(empty.search(q, K), *brute(q, x[:2000], keys[:2000], K))
    assert_same(dup.search(q, K), *brute(q, x[1000:], keys[1000:], K))


@pytest.mark.parametrize("spec", SPECS)
def test_concurrent_searches(spec, data):
    keys, x, q = data
    index = create_index(spec, x.shape[1])
    index.add(keys, x)
    ref_s, ref_ids = brute(q, x, keys, K)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            barrier.wait(timeout=30)
            for _ in range(10):
                lo = int(r.integers(0, q.shape[0]))
                hi = int(r.integers(lo + 1, q.shape[0] + 1))
                res = index.search(q[lo:hi], K)
                assert_same(res, ref_s[lo:hi], ref_ids[lo:hi])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


def test_small_gallery_uses_float32_rows(data, monkeypatch):
    monkeypatch.setattr(compressed, "_SMALL_VALUES", 1 << 22)
    keys, x, q = data
    index = create_index("exact-int8", x.shape[1])
    index.add(keys, x)
    assert_same(index.search(q, K), *brute(q, x, keys, K))
    assert index.scored_bytes == index.keys().size * x.shape[1]  # int8: 1 byte per dim
