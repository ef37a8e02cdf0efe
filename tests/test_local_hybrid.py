"""Fusion scores of the hybrid pipeline against their closed form."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.local.hybrid import (
    fused_pairwise,
    fused_scores,
    overturns,
    standardize,
    to_unit,
    verified_order,
)


def test_standardize_matches_the_closed_form(rng):
    ref = rng.normal(3.0, 2.0, 50)
    x = rng.normal(size=7)
    np.testing.assert_allclose(standardize(x, ref), (x - ref.mean()) / ref.std())
    # a flat or empty shortlist: centred, unscaled (no division by ~0)
    np.testing.assert_allclose(standardize(x, np.full(5, 2.0)), x - 2.0)
    np.testing.assert_allclose(standardize(x, np.array([])), 0.0)


def test_fused_scores_match_the_closed_form_and_are_scale_free(rng):
    g, loc = rng.uniform(0.3, 0.9, 40), rng.exponential(0.01, 40)
    loc[7] = 0.5  # one strong local match
    base = fused_scores(g, loc, global_ref=g, local_ref=loc)
    gz, lz = (g - g.mean()) / g.std(), (loc - loc.mean()) / loc.std()
    want = np.maximum(gz - 3, 0) + np.maximum(lz - 3, 0) + 0.01 * gz
    np.testing.assert_allclose(base, want)
    assert np.argmax(base) == 7
    # rescaling or shifting one source (a different model or codebook) changes nothing
    again = fused_scores(0.1 * g + 5, 40 * loc, global_ref=0.1 * g + 5, local_ref=40 * loc)
    np.testing.assert_allclose(base, again, atol=1e-9)
    # without local evidence above the threshold: the global order
    flat = fused_scores(g, rng.uniform(0, 0.01, 40), global_ref=g,
                        local_ref=rng.uniform(0, 0.01, 100))
    np.testing.assert_array_equal(np.argsort(-flat, kind="stable")[:5],
                                  np.argsort(-g, kind="stable")[:5])
    with pytest.raises(InputError):
        fused_scores(g, loc[:3], global_ref=g, local_ref=loc)
    with pytest.raises(InputError):
        fused_scores(g, loc, global_ref=g, local_ref=loc, local_weight=-1)


def test_fused_pairwise_is_a_symmetric_similarity(rng):
    x = rng.standard_normal((6, 4))
    gp = np.corrcoef(x)
    lp = np.abs(gp) * 0.1
    s = fused_pairwise(gp, lp, global_ref=rng.uniform(0, 1, 10), local_ref=rng.uniform(0, .1, 10))
    assert s.shape == (6, 6) and np.allclose(s, s.T) and np.allclose(np.diag(s), 1.0)
    assert ((s >= 0) & (s <= 1)).all()
    assert to_unit(np.array([-1.0, 0.0]))[1] == 0.0 and to_unit(np.array([-1.0]))[0] == 0.0


def test_verified_order_puts_verified_first_by_inliers_then_the_fused_order():
    fused = np.array([0.9, 0.5, 0.1, -0.2, 0.3])
    inl = np.array([0, 40, 14, 15, 0])
    order, score = verified_order(fused, inl, 15)
    assert order.tolist() == [1, 3, 0, 4, 2]  # 40, 15 inliers; then fused 0.9, 0.3, 0.1
    np.testing.assert_allclose(score[:2], [40, 15])
    np.testing.assert_allclose(score[2:], np.tanh(fused[[0, 4, 2]] / 4.0))
    # verified in the fused order instead
    order, score = verified_order(fused, inl, 15, by="fused")
    assert order.tolist() == [1, 3, 0, 4, 2] and (np.diff(score) <= 0).all()
    order, _ = verified_order(fused, np.zeros(5), 15)
    assert order.tolist() == np.argsort(-fused, kind="stable").tolist()
    with pytest.raises(InputError):
        verified_order(fused, inl, 1)


def test_verified_first_candidate_is_overturned_only_by_significantly_more_inliers():
    # fused order 0..5; the first (global top-1) verifies with 30 inliers
    fused = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    inl = np.array([30, 36, 49, 0, 12, 100])
    # 36 - 30 = 6 <= 2 sqrt(66); 49 - 30 = 19 > 2 sqrt(79) = 17.8; 100 overturns
    assert overturns(inl, 30.0, 2.0).tolist() == [False, False, True, False, False, True]
    order, score = verified_order(fused, inl, 10, keep_first=2.0)
    assert order.tolist() == [5, 2, 0, 1, 4, 3]
    assert (np.diff(score) < 0).all() and score[2] == 36.5  # kept: above 36, below 49
    # margin 0: the plain inlier order
    assert verified_order(fused, inl, 10, keep_first=0.0)[0].tolist() == [5, 2, 1, 0, 4, 3]
    # a first candidate that does not verify is not kept
    inl2 = inl.copy()
    inl2[0] = 9
    assert verified_order(fused, inl2, 10, keep_first=2.0)[0].tolist() == [5, 2, 1, 4, 0, 3]
    # nothing verified behind it: its score is its own count
    order, score = verified_order(fused, np.array([30, 0, 0, 0, 0, 80]), 10, keep_first=2.0)
    assert order.tolist() == [5, 0, 1, 2, 3, 4] and score[1] == 30
    with pytest.raises(InputError):
        verified_order(fused, inl, 10, keep_first=-1.0)


def test_mutual_ratio_matches_equal_the_general_matcher(rng):
    from galleria.local.hybrid import mutual_ratio_matches
    from galleria.local.matching import match_descriptors

    for n, m in ((60, 80), (5, 1), (0, 4), (30, 30)):
        a = rng.standard_normal((n, 16)).astype(np.float32)
        b = np.r_[a[: min(n, m) // 2] + 0.1 * rng.standard_normal((min(n, m) // 2, 16)),
                  rng.standard_normal((m - min(n, m) // 2, 16))].astype(np.float32)
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-9)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-9)
        want = match_descriptors(a, b, method="mutual+ratio", ratio=0.8)
        np.testing.assert_array_equal(mutual_ratio_matches(a, b, 0.8), want)
