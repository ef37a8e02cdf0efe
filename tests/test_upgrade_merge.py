"""Merge rules, calibrations and backfill metrics (pure functions) against references."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.types import SearchResult
from galleria.upgrade.merge import (
    Calibration,
    ScoreMap,
    area_under_curve,
    fit_affine,
    fit_calibration,
    fit_platt,
    fit_quantile,
    knn_similarities,
    linear_area,
    merge_results,
    merged_scores,
    negative_flip_rate,
)
from galleria.validate import l2_normalize


def topk(scores: np.ndarray, ids: np.ndarray, k: int) -> SearchResult:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return SearchResult(np.take_along_axis(scores, order, 1).astype(np.float32),
                        ids[order])


def test_merge_equals_ranking_of_merged_matrix(rng):
    q, g, k = 7, 40, 12
    s_old = rng.uniform(-1, 1, (q, g)).astype(np.float32)
    s_new = rng.uniform(-1, 1, (q, g)).astype(np.float32)
    mask = rng.random(g) < 0.4
    cal = Calibration(ScoreMap("affine", {"mean": 0.1, "std": 0.5}),
                      ScoreMap("affine", {"mean": -0.2, "std": 0.3}))
    ids = np.arange(g)
    old_part = topk(np.where(mask, -np.inf, s_old), np.where(mask, -1, ids), k)
    new_part = topk(np.where(mask, s_new, -np.inf), np.where(mask, ids, -1), k)
    # parts pad missing results with -1 / -inf like an index
    old_part.ids[np.isneginf(old_part.scores)] = -1
    new_part.ids[np.isneginf(new_part.scores)] = -1
    got = merge_results([old_part, new_part], k, maps=[cal.old, cal.new])
    ref = merged_scores(s_old, s_new, mask, cal)
    want = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got.ids, want)
    np.testing.assert_allclose(got.scores, np.take_along_axis(ref, want, 1), rtol=1e-6)


def test_merge_string_ids_padding_and_dedup():
    a = SearchResult(np.array([[0.9, 0.5, -np.inf]], np.float32),
                     np.array([["x", "y", None]], dtype=object))
    b = SearchResult(np.array([[0.7, 0.6]], np.float32), np.array([["z", "x"]], dtype=object))
    out = merge_results([a, b], 5)
    assert out.ids.tolist() == [["x", "z", "y", None, None]]
    assert out.scores[0, :3].tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert np.isneginf(out.scores[0, 3:]).all()
    with pytest.raises(InputError, match="string-id"):
        merge_results([a, SearchResult(np.zeros((1, 1), np.float32),
                                       np.zeros((1, 1), np.int64))], 2)


def test_score_maps_are_monotone_and_keep_missing(rng):
    src = rng.normal(0.6, 0.1, 5000)
    tgt = rng.normal(0.3, 0.05, 5000)
    m = fit_quantile(src, tgt)
    x = np.linspace(-1, 1.2, 500)
    y = m(x)
    assert np.all(np.diff(y) >= 0)
    # quantile matching sends the source median to the target median
    assert float(m(np.array([np.median(src)]))[0]) == pytest.approx(np.median(tgt), abs=0.01)
    assert np.isneginf(m(np.array([-np.inf])))[0]
    a = fit_affine(src)
    assert a(np.array([src.mean()]))[0] == pytest.approx(0.0, abs=1e-5)
    # round trip through JSON-able dicts
    assert ScoreMap.from_dict(m.to_dict())(x).tolist() == y.tolist()


def test_platt_matches_the_generating_logistic(rng):
    s = rng.uniform(-1, 1, 20000)
    p = 1 / (1 + np.exp(-(6 * s - 1)))
    y = rng.random(s.size) < p
    m = fit_platt(s, y)
    assert m.params["a"] == pytest.approx(6, rel=0.1)
    assert m.params["b"] == pytest.approx(-1, abs=0.15)


def test_quantile_calibration_undoes_a_monotone_distortion(rng):
    """Old scores that are a monotone distortion of comparable ones become comparable again."""
    x = l2_normalize(rng.standard_normal((300, 16)).astype(np.float32))
    # the "old model" sees the same geometry with squashed scores: s -> 0.5 s + 0.4
    old = np.concatenate([np.sqrt(0.5) * x, np.full((300, 1), np.sqrt(0.4))], axis=1)
    cal = fit_calibration("quantile", old_queries=old, old_gallery=old, new_embeddings=x, k=5)
    s = np.linspace(-0.2, 0.8, 50)
    np.testing.assert_allclose(cal.old(0.5 * s + 0.4), s, atol=0.03)
    # knn on the same set: the first neighbour is never the image itself
    sims, idx = knn_similarities(x, x, 3, self_index=np.arange(300))
    assert not (idx == np.arange(300)[:, None]).any()
    np.testing.assert_allclose(sims[:, 0], np.sort(x @ x.T - 9 * np.eye(300), 1)[:, -1],
                               rtol=1e-5)


def test_flip_rate_and_areas():
    old = np.array([1, 1, 0, 0, 1], bool)
    now = np.array([1, 0, 1, 0, 0], bool)
    assert negative_flip_rate(old, now) == pytest.approx(2 / 5)
    f = np.linspace(0, 1, 11)
    assert area_under_curve(f, 50 + 10 * f) == pytest.approx(linear_area(50, 60))
    assert area_under_curve(f, np.sqrt(f)) == pytest.approx(2 / 3, abs=0.01)
    with pytest.raises(InputError):
        area_under_curve([0, 0], [1, 1])


def test_cohort_znorm_merge_matches_reference(rng):
    """Per-query Z-norm: top lists normalised then merged == ranking the normalised matrix."""
    from galleria.upgrade.merge import CohortNorm, cohort_stats

    q, g, k, d = 5, 60, 15, 8
    qo = l2_normalize(rng.standard_normal((q, d)).astype(np.float32))
    qn = l2_normalize(rng.standard_normal((q, d + 2)).astype(np.float32))
    go = l2_normalize(rng.standard_normal((g, d)).astype(np.float32))
    gn = l2_normalize(rng.standard_normal((g, d + 2)).astype(np.float32))
    mask = rng.random(g) < 0.5
    norm = CohortNorm(go[:30], gn[:30], top=10)
    ids = np.arange(g)
    s_old, s_new = qo @ go.T, qn @ gn.T
    old_part = topk(np.where(mask, -np.inf, s_old), np.where(mask, -1, ids), k)
    new_part = topk(np.where(mask, s_new, -np.inf), np.where(mask, ids, -1), k)
    old_part.ids[np.isneginf(old_part.scores)] = -1
    new_part.ids[np.isneginf(new_part.scores)] = -1
    a, b = norm.apply(old_part, new_part, qo, qn)
    got = merge_results([a, b], k)
    ref = merged_scores(s_old, s_new, mask, norm, old_queries=qo, new_queries=qn)
    np.testing.assert_array_equal(got.ids, np.argsort(-ref, axis=1, kind="stable")[:, :k])
    # the statistics themselves, against a direct computation
    m, s = cohort_stats(qo, go[:30], top=10)
    top = -np.sort(-(qo @ go[:30].T), axis=1)[:, :10]
    np.testing.assert_allclose(m[:, 0], top.mean(1), rtol=1e-5)
    np.testing.assert_allclose(s[:, 0], top.std(1), rtol=1e-4)
    with pytest.raises(InputError, match="query embeddings"):
        merged_scores(s_old, s_new, mask, norm)
