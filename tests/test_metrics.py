"""Metrics against published reference values and brute-force loops on seeded data."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.eval import metrics as M
from galleria.eval import revisitop
from galleria.types import SearchResult

# --------------------------------------------------------------------------- #
# Reference implementations (plain loops)
# --------------------------------------------------------------------------- #


def official_compute_map(ranks_nq, gnd, kappas):
    """The revisitop algorithm as published: ranks are (db_size, Q), explicit loops."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total, pr, nempty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        qgnd = np.asarray(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = np.nan
            prs[i] = np.nan
            nempty += 1
            continue
        qgndj = np.asarray(gnd[i].get("junk", []))
        pos = np.arange(ranks_nq.shape[0])[np.isin(ranks_nq[:, i], qgnd)]
        junk = np.arange(ranks_nq.shape[0])[np.isin(ranks_nq[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            for ip in range(len(pos)):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            p1 = (j + 1) / (rank + 1)
            ap += (p0 + p1) / (2 * len(qgnd))
        total += ap
        aps[i] = ap
        pos = pos + 1
        for j, kap in enumerate(kappas):
            kq = min(max(pos), kap)
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i]
    return total / (nq - nempty), aps, pr / (nq - nempty), prs


def naive_metrics(ranking, ql, gl, qgi, names):
    """Per-query metrics by looping over a full or truncated ranking."""
    out = {n: [] for n in names}
    for q, row in enumerate(ranking):
        row = [int(i) for i in row if i >= 0 and i != qgi[q]]
        relevant = {j for j in range(len(gl)) if gl[j] == ql[q] and j != qgi[q]}
        R = len(relevant)
        rel = [i in relevant for i in row]
        for n in names:
            if R == 0:
                out[n].append(np.nan)
                continue
            hits, s = 0, 0.0
            prec = []
            for i, r in enumerate(rel, start=1):
                hits += r
                prec.append(hits / i if r else 0.0)
            if n == "mAP":
                v = sum(prec) / R
            elif n == "mAP@R":
                v = sum(prec[:R]) / R
            elif n.startswith("mAP@"):
                k = int(n[4:])
                v = sum(prec[:k]) / min(R, k)
            elif n.startswith("R@"):
                v = float(any(rel[: int(n[2:])]))
            elif n.startswith("P@"):
                k = int(n[2:])
                v = sum(rel[:k]) / k
            else:
                v = float(sum(rel[:4]))
            s = v
            out[n].append(s)
    return {n: np.array(v) for n, v in out.items()}


def stable_ranking(scores):
    g = scores.shape[1]
    return np.array([sorted(range(g), key=lambda j, r=r: (-r[j], j)) for r in scores])


# --------------------------------------------------------------------------- #
# revisitop
# --------------------------------------------------------------------------- #


def test_compute_ap_reference_value():
    assert M.compute_ap([0, 2, 5], 3) == pytest.approx(0.677778, abs=1e-6)


def test_junk_removal_reference_value():
    pos = np.array([0, 2, 6, 10, 20])
    junk = np.array([1, 8, 9, 30])
    np.testing.assert_array_equal(revisitop._remove_junk(pos, junk), [0, 1, 5, 7, 17])
    # the same through compute_map on a full ranking of 40 items
    ranking = np.arange(40)[None, :]
    m, _, _, _ = M.compute_map(ranking, [{"ok": pos, "junk": junk}])
    assert m == pytest.approx(M.compute_ap([0, 1, 5, 7, 17], 5))


def _random_gnd(rng, n_db, nq, *, empty_every=0):
    gnd = []
    for i in range(nq):
        perm = rng.permutation(n_db)
        n_e, n_h, n_j = rng.integers(0, 8, size=3)
        if empty_every and i % empty_every == 0:
            n_e = n_h = 0
        gnd.append(
            {
                "easy": perm[:n_e],
                "hard": perm[n_e : n_e + n_h],
                "junk": perm[n_e + n_h : n_e + n_h + n_j],
            }
        )
    return gnd


def test_compute_map_matches_official_loop(rng):
    n_db, nq = 60, 25
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)])
    gnd = [
        {"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])}
        for g in _random_gnd(rng, n_db, nq, empty_every=7)
    ]
    kappas = [1, 5, 10]
    got = M.compute_map(ranks, gnd, kappas)
    ref = official_compute_map(ranks.T.copy(), gnd, kappas)
    assert got[0] == pytest.approx(ref[0], abs=1e-12)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-12)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-12)
    np.testing.assert_allclose(got[3], ref[3], atol=1e-12)
    assert np.isnan(got[1][0]) and np.isnan(got[3][0]).all()  # no positives: excluded


def test_precision_at_kappa_official_definition():
    # positives at 1-based positions 1 and 3: kq = min(max(pos), kappa)
    ranking = np.array([[0, 9, 1, 8, 7, 6, 5, 4, 3, 2]])
    _, _, pr, _ = M.compute_map(ranking, [{"ok": [0, 1]}], [1, 5, 10])
    np.testing.assert_allclose(pr, [1.0, 2 / 3, 2 / 3])


def test_revisitop_evaluate_settings_scores_and_ranks_agree(rng):
    n_db, nq = 80, 20
    gnd = _random_gnd(rng, n_db, nq, empty_every=6)
    scores = rng.standard_normal((nq, n_db)).astype(np.float32)
    ranks = np.argsort(-scores, axis=1, kind="stable")
    a = M.revisitop_evaluate(scores, gnd)
    b = M.revisitop_evaluate(ranks, gnd)
    c = M.revisitop_evaluate(SearchResult(np.sort(scores)[:, ::-1], ranks), gnd)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k]) and a[k] == pytest.approx(c[k])
    easy = [{"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])} for g in gnd]
    med = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
    hard = [{"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]
    for s, gt in (("E", easy), ("M", med), ("H", hard)):
        m, _, pr, _ = official_compute_map(ranks.T.copy(), gt, [1, 5, 10])
        assert a[f"{s}_mAP"] == pytest.approx(m)
        for k, v in zip((1, 5, 10), pr, strict=True):
            assert a[f"{s}_mP@{k}"] == pytest.approx(v)


def test_revisitop_all_queries_empty_gives_nan():
    gnd = [{"easy": [], "hard": [1], "junk": []}]
    out = M.revisitop_evaluate(np.array([[0.1, 0.9, 0.5]]), gnd)
    assert np.isnan(out["E_mAP"]) and out["H_mAP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- #
# ranking
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("depth", [1, 3, 7, 40])
def test_rank_gallery_partial_equals_full_with_ties(rng, depth):
    scores = rng.integers(0, 5, size=(30, 40)).astype(np.float32)  # many ties
    full = stable_ranking(scores)
    np.testing.assert_array_equal(M.rank_gallery(scores), full)
    np.testing.assert_array_equal(M.rank_gallery(scores, depth=depth), full[:, :depth])


# --------------------------------------------------------------------------- #
# label-based metrics
# --------------------------------------------------------------------------- #

NAMES = ("mAP", "mAP@R", "mAP@5", "mAP@100", "R@1", "R@5", "P@1", "P@3", "N-S")


@pytest.mark.parametrize("self_in_gallery", [False, True])
def test_label_metrics_match_naive_loop_on_scores(rng, self_in_gallery):
    g = 120
    gl = rng.integers(0, 9, size=g)
    if self_in_gallery:  # leave-one-out: every gallery item is a query
        ql, qgi = gl.copy(), np.arange(g)
        x = rng.standard_normal((g, 8)).astype(np.float32)
        scores = x @ x.T
    else:
        ql = rng.integers(0, 11, size=50)  # labels 9, 10 have no relevant items
        qgi = np.full(50, -1)
        scores = rng.standard_normal((50, g)).astype(np.float32)
    scores = np.round(scores, 1)  # ties
    got = M.per_query_metrics(scores, ql, gl, metrics=NAMES, query_gallery_index=qgi)
    ref = naive_metrics(stable_ranking(scores), ql, gl, qgi, NAMES)
    for n in NAMES:
        np.testing.assert_allclose(got[n], ref[n], atol=1e-12, err_msg=n)
    means = M.retrieval_metrics(scores, ql, gl, metrics=NAMES, query_gallery_index=qgi)
    for n in NAMES:
        assert means[n] == pytest.approx(np.nanmean(ref[n]))


def test_label_metrics_on_truncated_ranking_with_missing(rng):
    g, q, k = 60, 20, 12
    gl = rng.integers(0, 5, size=g)
    ql = gl[:q]
    qgi = np.arange(q)
    qgi[::4] = -1
    ranking = np.stack([rng.permutation(g)[:k] for _ in range(q)])
    ranking[3, -2:] = -1  # faiss-style missing results
    got = M.per_query_metrics(ranking, ql, gl, metrics=NAMES, query_gallery_index=qgi)
    ref = naive_metrics(ranking, ql, gl, qgi, NAMES)
    for n in NAMES:
        np.testing.assert_allclose(got[n], ref[n], atol=1e-12, err_msg=n)
    res = SearchResult(np.zeros(ranking.shape, np.float32), ranking)
    got2 = M.per_query_metrics(res, ql, gl, metrics=NAMES, query_gallery_index=qgi)
    for n in NAMES:
        np.testing.assert_allclose(got2[n], got[n], atol=0)


def test_chunking_does_not_change_results(rng, monkeypatch):
    x = rng.standard_normal((90, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=90)
    qgi = np.arange(90)
    ref = M.retrieval_metrics(x @ x.T, labels, labels, metrics=NAMES, query_gallery_index=qgi)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 200)
    got = M.retrieval_metrics(x @ x.T, labels, labels, metrics=NAMES, query_gallery_index=qgi)
    assert got == pytest.approx(ref)


def test_wrappers_and_closed_forms():
    # 2 groups of 3; query 0 ranks: itself, one relevant, two irrelevant, last relevant
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([[9.0, 8.0, 1.0, 7.0, 6.0, 5.0]])
    ql = labels[:1]
    own = np.array([0])
    # without itself: ranking [1, 3, 4, 5, 2] -> hits at 1 and 5, R = 2
    assert M.mean_average_precision(scores, ql, labels, query_gallery_index=own) == (
        pytest.approx((1 + 2 / 5) / 2)
    )
    assert M.map_at_r(scores, ql, labels, query_gallery_index=own) == pytest.approx(0.5)
    assert M.map_at_k(scores, ql, labels, k=3, query_gallery_index=own) == pytest.approx(0.5)
    assert M.recall_at_k(scores, ql, labels, k=1, query_gallery_index=own) == 1.0
    assert M.precision_at_k(scores, ql, labels, k=2, query_gallery_index=own) == 0.5
    # UKBench: query included, perfect ranking -> 4
    ll = np.repeat(np.arange(3), 4)
    perfect = (ll[:, None] == ll[None, :]).astype(np.float32)
    assert M.ukbench_ns_score(perfect, ll) == pytest.approx(4.0)
    assert M.ukbench_ns_score(-perfect, ll) == pytest.approx(0.0)


def test_string_labels_and_no_relevant_is_nan():
    out = M.retrieval_metrics(
        np.array([[0.5, 0.1], [0.2, 0.3]]), ["cat", "emu"], ["cat", "dog"], metrics=("mAP",)
    )
    assert out["mAP"] == 1.0  # the "emu" query is left out
    assert np.isnan(M.retrieval_metrics(np.array([[0.1]]), ["a"], ["b"])["mAP"])


@pytest.mark.parametrize(
    ("x", "msg"),
    [
        (np.array([[np.nan, 1.0]]), "NaN"),
        (np.array([[1.0, 2.0, 3.0]]), "columns"),
        (np.array([[0, 0]]), "repeats"),
        (np.array([[0, 5]]), "gallery indices"),
        (np.zeros((2, 2)), "score matrix"),
    ],
)
def test_input_errors(x, msg):
    with pytest.raises(InputError, match=msg):
        M.retrieval_metrics(x, [0], [0, 1])


def test_unknown_metric_and_bad_query_gallery_index():
    with pytest.raises(InputError, match="unknown metric"):
        M.retrieval_metrics(np.zeros((1, 2)), [0], [0, 1], metrics=("NDCG",))
    with pytest.raises(InputError, match="query_gallery_index"):
        M.retrieval_metrics(np.zeros((1, 2)), [0], [0, 1], query_gallery_index=np.array([2]))


@pytest.mark.parametrize("chunk_elements", [1 << 22, 50])
def test_heavy_ties_exact_and_fallback(rng, monkeypatch, chunk_elements):
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", chunk_elements)  # 50 forces the sort fallback
    gl = rng.integers(0, 3, size=40)
    scores = rng.integers(0, 2, size=(40, 40)).astype(np.float64)  # ties everywhere
    qgi = np.arange(40)
    got = M.per_query_metrics(scores, gl, gl, metrics=NAMES, query_gallery_index=qgi)
    ref = naive_metrics(stable_ranking(scores), gl, gl, qgi, NAMES)
    for n in NAMES:
        np.testing.assert_allclose(got[n], ref[n], atol=1e-12, err_msg=n)
