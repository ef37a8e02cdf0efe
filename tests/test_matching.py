"""Descriptor matching and MAGSAC++ verification on a synthetic homography."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.local.matching import homography_inliers, match_descriptors, verify_pairs
from galleria.types import LocalFeatures


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _apply(h, pts):
    p = np.c_[pts, np.ones(len(pts))] @ h.T
    return p[:, :2] / p[:, 2:]


H = np.array([[0.9, 0.1, 20.0], [-0.05, 1.1, -10.0], [1e-4, 5e-5, 1.0]])


def test_mutual_and_ratio_matches_against_brute_force(rng):
    a = _unit(rng.standard_normal((50, 16)))
    b = _unit(np.r_[a[:30] + 0.05 * rng.standard_normal((30, 16)),
                    rng.standard_normal((40, 16))])
    s = a @ b.T
    m = match_descriptors(a, b, method="mutual")
    ref = [(i, int(np.argmax(s[i]))) for i in range(50)
           if int(np.argmax(s[:, int(np.argmax(s[i]))])) == i]
    assert [tuple(x) for x in m.tolist()] == ref
    assert {tuple(x) for x in m[:30].tolist()} >= {(i, i) for i in range(30)}
    r = match_descriptors(a, b, method="ratio", ratio=0.8)
    for i, j in r.tolist():
        d = np.sort(np.sqrt(np.maximum(2 - 2 * s[i], 0)))
        assert d[0] < 0.8 * d[1] and j == np.argmax(s[i])
    both = match_descriptors(a, b, method="mutual+ratio")
    assert set(map(tuple, both.tolist())) <= set(map(tuple, m.tolist()))
    assert match_descriptors(a[:0], b).shape == (0, 2)
    with pytest.raises(InputError):
        match_descriptors(a, b, method="nope")


def test_magsac_finds_the_inliers_of_a_homography(rng):
    src = rng.uniform(0, 600, (120, 2))
    dst = _apply(H, src) + rng.normal(0, 0.5, (120, 2))
    dst[80:] = rng.uniform(0, 600, (40, 2))  # a third are outliers
    n = homography_inliers(src, dst, threshold=4.0)
    assert 75 <= n <= 84
    assert homography_inliers(src[:3], dst[:3]) == 0
    assert homography_inliers(src, dst, threshold=4.0) == n  # deterministic


def test_verify_pairs_ranks_the_true_view_first(rng):
    n = 200
    desc = _unit(rng.standard_normal((n, 32)))
    pts = rng.uniform(0, 500, (n, 2))

    def feats(p, d):
        kp = np.c_[p, np.ones((len(p), 1)), np.ones((len(p), 1))].astype(np.float32)
        return LocalFeatures(kp, d, (500, 500))

    query = feats(pts, desc)
    view = feats(_apply(H, pts), _unit(desc + 0.05 * rng.standard_normal(desc.shape)))
    # same descriptors, scrambled geometry: descriptor matches but no homography
    scrambled = feats(rng.uniform(0, 500, (n, 2)), view.descriptors)
    other = feats(pts, _unit(rng.standard_normal((n, 32))))
    empty = LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, 32), np.float32))
    inl = verify_pairs(query, [other, scrambled, view, empty])
    assert inl[2] > 150 and inl[1] < 30 and inl[0] < 30 and inl[3] == 0
    assert verify_pairs(empty, [view]).tolist() == [0]
