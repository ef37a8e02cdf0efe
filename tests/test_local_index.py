"""ASMK and CANN local indexes against brute-force references on seeded synthetic
descriptors; the shared contract (add/remove/save/load/copy, headers, empty queries,
concurrent searches) is one test parametrized over both."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.local.asmk import AsmkIndex, auto_codebook_size
from galleria.local.cann import CannIndex, vote
from galleria.local.factory import create_local_index, load_local_index
from galleria.local.kernels import (
    aggregate_residuals,
    binarize,
    cann_kernel,
    hamming_similarity,
    selective_kernel,
)
from galleria.types import LocalFeatures

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _feats(rng: np.random.Generator, n: int) -> LocalFeatures:
    x = _unit(rng.standard_normal((n, D)))
    kp = np.c_[rng.uniform(0, 100, (n, 2)), np.ones((n, 1)), rng.uniform(0, 1, (n, 1))]
    return LocalFeatures(kp.astype(np.float32), x, (100, 100))


def _noisy(rng: np.random.Generator, f: LocalFeatures, sigma: float) -> LocalFeatures:
    return LocalFeatures(f.keypoints, _unit(f.descriptors + sigma * rng.standard_normal(
        f.descriptors.shape)), f.image_size)


@pytest.fixture()
def data(rng):
    gallery = [_feats(rng, int(rng.integers(15, 60))) for _ in range(30)]
    gallery[7] = LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, D), np.float32))
    queries = [_noisy(rng, gallery[i], 0.15) for i in (0, 3, 11, 29)]
    return gallery, queries


def _make(kind: str, **kw):
    if kind == "asmk":
        kw.setdefault("multiple_assignment", 1)
        return AsmkIndex(D, codebook_size=16, fingerprint="fp@1", seed=0, **kw)
    return CannIndex(D, index="flat", knn=20, p0=1.2, p1=0.5, fingerprint="fp@1", **kw)


# ---------------------------------------------------------------------- kernels ---


def test_binary_codes_and_hamming(rng):
    x = rng.standard_normal((5, 70)).astype(np.float32)
    c = binarize(x)
    assert c.shape == (5, 2) and c.dtype == np.uint64
    ref = 1 - 2 * ((x[0] > 0) != (x[1:] > 0)).sum(axis=1) / 70
    assert np.allclose(hamming_similarity(np.repeat(c[:1], 4, 0), c[1:], 70), ref)
    assert np.allclose(selective_kernel(np.array([-0.5, 0.0, 0.2, 1.0]), alpha=3, tau=0),
                       [0, 0, 0.008, 1])


def test_aggregate_residuals_with_multiple_assignment(rng):
    x, cent = rng.standard_normal((6, 4)), rng.standard_normal((3, 4))
    words = np.array([[0, 2], [1, -1], [0, 1], [2, 2], [1, 0], [0, -1]])
    uw, sums = aggregate_residuals(x.astype(np.float32), words, cent.astype(np.float32))
    assert uw.tolist() == [0, 1, 2]
    for w in range(3):
        rows = [i for i in range(6) for a in words[i] if a == w]
        assert np.allclose(sums[w], sum(x[i] - cent[w] for i in rows), atol=1e-5)


def test_cann_kernel_shape():
    r = np.array([0.0, 0.25, 0.5, 1.0, 2.0], np.float32)
    assert np.allclose(cann_kernel(r, p0=1.0, p1=0.5), [1, 0.75, 0.5, 0, 0])
    box = cann_kernel(r, p0=1.0, p1=0.99)
    assert box[0] == 1 and box[2] > 0.99 and box[3] == 0
    assert (np.diff(cann_kernel(r, p0=1.5, p1=0.3)) <= 0).all()
    with pytest.raises(InputError):
        cann_kernel(r, p0=0, p1=0.5)
    assert auto_codebook_size(10) == 256 and auto_codebook_size(10**9) == 16384


# ---------------------------------------------------- brute-force references ---


def test_asmk_scores_and_pairwise_match_brute_force(data):
    gallery, queries = data
    idx = _make("asmk", multiple_assignment=3)
    idx.add(np.arange(10), gallery[:10])  # two batches: two segments, merged or not
    idx.add(np.arange(10, 30), gallery[10:])

    def encode(f: LocalFeatures, m: int):
        return idx._encode(f.descriptors, m) if len(f) else (np.zeros(0, int), None)

    def brute(a, b) -> float:
        (aw, ac), (bw, bc) = a, b
        if not aw.size or not bw.size:
            return 0.0
        _, ia, ib = np.intersect1d(aw, bw, return_indices=True)
        s = selective_kernel(hamming_similarity(ac[ia], bc[ib], D), alpha=3, tau=0).sum()
        return float(s / np.sqrt(aw.size * bw.size))

    db = [encode(f, 1) for f in gallery]
    for q in queries:
        ref = np.array([brute(encode(q, 3), g) for g in db])
        assert np.allclose(idx.score_rows(q), ref, atol=1e-5)
    keys = np.array([0, 3, 7, 11, 29, 12])
    ref = np.array([[brute(db[i], db[j]) for j in keys] for i in keys])
    np.fill_diagonal(ref, [0.0 if i == 7 else 1.0 for i in keys])
    assert np.allclose(idx.pairwise(keys), ref, atol=1e-5)


def test_cann_flat_matches_brute_force_and_ivf_agrees(data):
    gallery, queries = data
    allx = np.concatenate([g.descriptors for g in gallery])
    owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(gallery)])
    flat = _make("cann")
    flat.add(np.arange(30), gallery)
    ivf = CannIndex(D, index="IVF8,Flat", knn=20, p0=1.2, p1=0.5, nprobe=8)  # all lists
    ivf.add(np.arange(30), gallery)
    for q in queries:
        d2 = ((q.descriptors[:, None, :] - allx[None]) ** 2).sum(-1)
        nn = np.argsort(d2, axis=1, kind="stable")[:, :20]
        ref = np.zeros(30)
        for i in range(len(q)):
            seen = set()
            for j in nn[i]:  # each (query feature, image) pair counts once: its nearest
                if owner[j] not in seen:
                    seen.add(owner[j])
                    ref[owner[j]] += cann_kernel(np.sqrt(d2[i, j]), p0=1.2, p1=0.5)
        ref /= len(q)
        assert np.allclose(flat.score_rows(q), ref, atol=1e-5)
        assert np.allclose(ivf.score_rows(q), ref, atol=1e-4)


def test_vote_counts_each_image_once_per_query_feature():
    ids = np.array([[1 << 16 | 0, 1 << 16 | 1, 2 << 16 | 0]])
    d2 = np.array([[0.0, 0.01, 0.25]], np.float32)
    s = vote(d2, ids, 3, p0=1.0, p1=0.5)
    assert np.allclose(s, [0.0, 1.0, 0.5])


# ---------------------------------------------------------- shared contract ---


@pytest.mark.parametrize("kind", ["asmk", "cann"])
def test_contract_add_remove_save_load_copy(kind, data, tmp_path):
    gallery, queries = data
    idx = _make(kind)
    keys = np.arange(30, dtype=np.int64) * 10 + 5
    idx.add(keys[:20], gallery[:20])
    idx.add(keys[20:], gallery[20:])
    assert len(idx) == 30 and sorted(idx.keys().tolist()) == keys.tolist()
    with pytest.raises(InputError):
        idx.add(keys[:1], gallery[:1])
    with pytest.raises(InputError):
        idx.add(np.array([1, 2]), gallery[:1])
    full = idx.search(queries, 5)
    assert full.ids.dtype == np.int64 and full.ids[:, 0].tolist() == keys[[0, 3, 11, 29]].tolist()

    snapshot = idx.copy()
    assert idx.remove(np.array([keys[0], keys[3], 999999])) == 2
    res = idx.search(queries, 30)
    assert keys[0] not in res.ids and keys[3] not in res.ids
    assert (res.ids[:, -2:] == -1).all() and np.isneginf(res.scores[:, -2:]).all()
    assert snapshot.search(queries, 5).ids.tolist() == full.ids.tolist()  # copy untouched

    idx.add(np.array([keys[0]]), [gallery[0]])  # re-add a removed key
    assert idx.search(queries[:1], 1).ids[0, 0] == keys[0]
    idx.generation = 7
    idx.save(tmp_path / "ix")
    idx.save(tmp_path / "ix")  # a second save replaces the first (old files deleted)
    back = load_local_index(tmp_path / "ix", fingerprint="fp@1", dim=D)
    assert type(back) is type(idx) and back.generation == 7 and len(back) == len(idx)
    a, b = idx.search(queries, 10), back.search(queries, 10)
    assert a.ids.tolist() == b.ids.tolist() and np.allclose(a.scores, b.scores, atol=1e-6)
    assert sorted(back.keys().tolist()) == sorted(idx.keys().tolist())
    with pytest.raises(CompatibilityError):
        load_local_index(tmp_path / "ix", fingerprint="other@2")
    with pytest.raises(CompatibilityError):
        load_local_index(tmp_path / "ix", dim=D + 1)
    other = AsmkIndex if kind == "cann" else CannIndex
    with pytest.raises(FormatError):
        other.load(tmp_path / "ix")
    with pytest.raises(FormatError):
        load_local_index(tmp_path / "nothing")
    assert idx.nbytes() > 0


@pytest.mark.parametrize("kind", ["asmk", "cann"])
def test_bad_input_and_empty_queries(kind, data):
    gallery, queries = data
    idx = _make(kind)
    blank = LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, D), np.float32))
    assert (idx.search([queries[0]], 3).ids == -1).all()  # empty index: all missing
    idx.add(np.arange(30), gallery)
    res = idx.search([blank, queries[0]], 4)
    assert (res.ids[0] == -1).all() and np.isneginf(res.scores[0]).all()
    assert res.ids[1, 0] == 0
    with pytest.raises(InputError):
        idx.search([_feats(np.random.default_rng(1), 5).descriptors], 3)
    with pytest.raises(InputError):
        idx.search([LocalFeatures(np.zeros((2, 4), np.float32), np.ones((2, D + 1)))], 3)
    with pytest.raises(InputError):
        idx.search(queries, 0)
    with pytest.raises(InputError):
        idx.search([], 3)
    assert np.allclose(idx.similarities(queries[1], np.array([3, 4])),
                       idx.score_rows(queries[1])[[3, 4]])
    with pytest.raises(InputError):
        idx.similarities(queries[1], np.array([12345]))
    with pytest.raises(InputError):
        create_local_index("nope", D)


@pytest.mark.parametrize("kind", ["asmk", "cann"])
def test_concurrent_searches_equal_sequential(kind, data):
    gallery, queries = data
    idx = _make(kind)
    idx.add(np.arange(30), gallery)
    ref = idx.search(queries, 8)
    out: list[object] = []

    def work() -> None:
        for _ in range(5):
            r = idx.search(queries, 8)
            out.append(r.ids.tolist() == ref.ids.tolist()
                       and np.allclose(r.scores, ref.scores))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and out == [True] * 20


def test_asmk_segments_merge_and_compact(data, rng):
    gallery, _ = data
    idx = _make("asmk").train(gallery)
    for i in range(30):  # 30 single-image adds: log-structured, few segments
        idx.add(np.array([i]), [gallery[i]])
    assert len(idx._segs) <= 6
    before = sum(s.size for s in idx._segs)
    idx.remove(np.arange(0, 30, 2))
    assert sum(s.size for s in idx._segs) < before  # dead entries dropped by a merge
    again = _make("asmk").train(gallery)
    again.add(np.arange(30), gallery)
    again.remove(np.arange(0, 30, 2))
    q = _noisy(rng, gallery[5], 0.1)
    assert np.allclose(idx.score_rows(q)[1::2], again.score_rows(q)[1::2], atol=1e-5)


def test_asmk_encode_then_add_encoded_equals_add(data):
    gallery, queries = data
    a = _make("asmk").train(gallery)
    b = _make("asmk").train(gallery)
    a.add(np.arange(30), gallery)
    enc = b.encode(gallery)
    assert enc[7][0].size == 0 and enc[0][1].dtype == np.uint64
    b.add_encoded(np.arange(30), enc)
    for q in queries:
        assert np.allclose(a.score_rows(q), b.score_rows(q))
    with pytest.raises(InputError):
        b.add_encoded(np.array([99]), [(np.array([1, 1]), enc[0][1][:2])])


@pytest.mark.parametrize("kind", ["asmk", "cann"])
def test_empty_like_keeps_the_training_and_the_scores(kind, data):
    """A store view's delta index (``empty_like``) keeps the base's training and never
    sees its images; ASMK scores an image exactly as one index would."""
    gallery, queries = data
    base = _make(kind)
    base.add(np.arange(20), gallery[:20])
    delta = base.empty_like()
    assert len(delta) == 0 and delta.is_trained and delta.params() == base.params()
    delta.add(np.arange(20, 30), gallery[20:])
    whole = _make(kind)
    whole.add(np.arange(20), gallery[:20])
    whole.add(np.arange(20, 30), gallery[20:])  # trained on the first 20, like base
    got, ref = delta.search(queries, 10), whole.search(queries, 30)
    for i in range(len(queries)):
        want = {int(k): s for k, s in zip(ref.ids[i], ref.scores[i], strict=True) if k >= 20}
        for k, s in zip(got.ids[i], got.scores[i], strict=True):
            if k < 0:
                continue
            if kind == "asmk":  # per-image aggregation: the same score
                assert s == pytest.approx(want[int(k)], abs=1e-5)
            else:  # kNN votes among fewer descriptors: never lower (the pipelines search
                # one folded index for that reason)
                assert s >= want.get(int(k), 0.0) - 1e-6
    assert len(base) == 20 and set(base.keys().tolist()) == set(range(20))


def test_asmk_add_index_equals_add_without_quantizing_again(data):
    """A store folds a delta into its base with ``add_index`` (the 11.4k gallery's save
    quantized every descriptor twice: once into the delta, again into the base)."""
    gallery, queries = data
    base = _make("asmk")
    base.add(np.arange(20), gallery[:20])
    base.remove(np.array([3]))
    delta = base.empty_like()
    delta.add(np.arange(20, 30), gallery[20:])
    delta.remove(np.array([25]))
    delta.add(np.array([3]), [gallery[3]])  # a key removed from the base, re-added
    ref = base.copy()
    ref.add(np.r_[20:25, 26:30, 3], [*gallery[20:25], *gallery[26:30], gallery[3]])
    calls = []
    folded = base.copy()
    folded._assign = lambda desc, m: calls.append(len(desc))  # type: ignore[method-assign]
    folded.add_index(delta)
    del folded._assign  # queries are quantized as usual
    assert not calls and len(folded) == len(ref) == 29
    for q in queries:
        a, b = folded.search([q], 29), ref.search([q], 29)
        got = dict(zip(a.ids[0].tolist(), a.scores[0].tolist(), strict=True))
        want = dict(zip(b.ids[0].tolist(), b.scores[0].tolist(), strict=True))
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    assert len(base) == 19  # the base copy is untouched
    with pytest.raises(InputError):  # keys already there
        folded.add_index(delta)
    other = AsmkIndex(D, codebook_size=16, fingerprint="fp@1", seed=1, multiple_assignment=1)
    other.add(np.array([100]), [gallery[0]])
    with pytest.raises(InputError):  # another codebook
        folded.add_index(other)
