"""MDS re-ranking cores against closed forms: exact Euclidean distances are recovered."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.rerank.mds import (
    classical_mds,
    cosine_to_query,
    mds_rerank_scores,
    scaled_defaults,
    similarity_to_distance,
    smacof,
    stress,
)


def _pdist(x):
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def _procrustes_error(a, b):
    """Residual of the best rotation/reflection + translation mapping b onto a."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(b.T @ a)
    return float(np.abs(b @ (u @ vt) - a).max())


def test_classical_mds_recovers_points_up_to_rotation(rng):
    x = rng.standard_normal((25, 3))
    y = classical_mds(_pdist(x), 3)
    assert y.shape == (25, 3) and _procrustes_error(x, y) < 1e-8
    assert np.allclose(_pdist(y), _pdist(x), atol=1e-8)
    assert classical_mds(_pdist(x), 5)[:, 3:].std() < 1e-6  # extra dimensions are empty


def test_smacof_converges_to_zero_stress_from_a_perturbed_start(rng):
    x = rng.standard_normal((30, 2))
    d = _pdist(x)
    x0 = x + 0.3 * rng.standard_normal(x.shape)
    y, s = smacof(d, x0, max_iter=2000, eps=1e-12)
    assert s < 1e-6 * stress(d, x0) and _procrustes_error(x, y) < 1e-3
    # the stress never increases, iteration by iteration
    prev = stress(d, x0)
    z = x0
    for _ in range(10):
        z, cur = smacof(d, z, max_iter=1, eps=0)
        assert cur <= prev + 1e-12
        prev = cur


def test_distance_transform():
    s = np.array([[1.0, 0.5, 0.0], [0.3, 1.0, 2.0], [0.0, 1.0, 1.0]])
    d = similarity_to_distance(s, 1.0)
    assert np.allclose(np.diag(d), 0) and np.allclose(d, d.T)
    assert np.isclose(d[0, 1], 1 - 0.4) and np.isclose(d[1, 2], 0.0) and d[0, 2] == 1.0
    assert np.isclose(similarity_to_distance(s, 0.01)[0, 1], 1 - 0.4**0.01)
    with pytest.raises(InputError):
        similarity_to_distance(s, 0)


def test_rerank_follows_the_cluster_structure_of_the_candidates():
    # the query's object: candidates 0, 1, 2 match each other; the query matches 0 and 1
    # well but 2 only weakly (0.05). Another object: 3, 4, 5 match each other and the
    # query a bit more (0.1) than 2 does. By direct score 2 ranks last; in the embedding
    # it sits with 0 and 1, on the query's side.
    q = np.array([0.6, 0.55, 0.05, 0.1, 0.1, 0.1])
    pair = np.eye(6)
    for i, j in [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]:
        pair[i, j] = pair[j, i] = 0.6
    for p in (1.0, 0.5, 0.01):
        new = mds_rerank_scores(q, pair, p=p, dim=5)
        assert new.shape == (6,) and new.dtype == np.float32
        assert set(np.argsort(-new)[:3].tolist()) == {0, 1, 2}, (p, new)
    g = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    blended = mds_rerank_scores(q, pair, p=1.0, dim=5, global_scores=g, blend=0.9)
    assert np.argmax(blended) == 5
    with pytest.raises(InputError):
        mds_rerank_scores(q, np.eye(5))


def test_cosine_to_query_and_scaled_defaults():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    c = cosine_to_query(x)
    assert c.shape == (3,) and np.argmax(c) == 0
    assert scaled_defaults(4993) == (700, 1600)
    assert scaled_defaults(500) == (70, 160)
    assert scaled_defaults(1_000_000) == (700, 1600)
    assert scaled_defaults(20) == (5, 10)
    assert scaled_defaults(3) == (3, 3)
