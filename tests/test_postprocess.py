"""alpha-QE, alpha-DBA and PCA-whitening against brute-force loops and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.search.postprocess import alpha_query_expansion, database_augmentation
from galleria.transforms.whiten import apply_pca_whitening, learn_pca_whitening


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def naive_aqe(queries, gallery, k, alpha, own=None):
    out = []
    for i, q in enumerate(queries):
        sims = [(float(q @ x), j) for j, x in enumerate(gallery) if own is None or j != own[i]]
        sims.sort(key=lambda t: -t[0])
        acc = q.astype(np.float64).copy()
        for s, j in sims[:k]:
            acc += max(s, 0.0) ** alpha * gallery[j]
        out.append(acc / np.linalg.norm(acc))
    return np.array(out)


@pytest.mark.parametrize(("k", "alpha"), [(1, 3.0), (5, 3.0), (7, 0.0), (3, 0.5)])
def test_alpha_qe_matches_loop(rng, k, alpha):
    g = unit(rng.standard_normal((50, 16)))
    q = unit(rng.standard_normal((9, 16)))
    got = alpha_query_expansion(q, g, k=k, alpha=alpha)
    np.testing.assert_allclose(got, naive_aqe(q, g, k, alpha), atol=1e-5)
    assert got.dtype == np.float32 and got.shape == q.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_alpha_qe_k0_is_identity_and_k_is_capped(rng):
    g = unit(rng.standard_normal((6, 4)))
    q = unit(rng.standard_normal((3, 4)))
    np.testing.assert_allclose(alpha_query_expansion(q, g, k=0, alpha=3), q, atol=1e-6)
    np.testing.assert_allclose(
        alpha_query_expansion(q, g, k=100, alpha=1.0), naive_aqe(q, g, 6, 1.0), atol=1e-5
    )


def test_alpha_qe_skips_the_query_itself(rng):
    g = unit(rng.standard_normal((30, 8)))
    own = np.array([4, -1, 17])
    q = g[[4, 0, 17]].copy()
    q[1] = unit(rng.standard_normal((1, 8)))[0]
    got = alpha_query_expansion(q, g, k=3, alpha=3.0, query_gallery_index=own)
    np.testing.assert_allclose(got, naive_aqe(q, g, 3, 3.0, own), atol=1e-5)


def test_database_augmentation_matches_loop(rng):
    g = unit(rng.standard_normal((40, 12)))
    got = database_augmentation(g, k=4, alpha=3.0)
    ref = naive_aqe(g, g, 4, 3.0, own=np.arange(40))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # row order does not matter
    perm = rng.permutation(40)
    np.testing.assert_allclose(database_augmentation(g[perm], k=4, alpha=3.0), got[perm], atol=1e-6)


def test_postprocess_input_errors(rng):
    g = unit(rng.standard_normal((5, 4)))
    with pytest.raises(InputError, match="dimension"):
        alpha_query_expansion(g[:, :3], g, k=2, alpha=3)
    with pytest.raises(InputError, match="k must"):
        alpha_query_expansion(g, g, k=-1, alpha=3)
    with pytest.raises(InputError, match="alpha"):
        database_augmentation(g, k=1, alpha=-1)
    with pytest.raises(InputError, match="query_gallery_index"):
        alpha_query_expansion(g, g, k=1, alpha=3, query_gallery_index=np.array([0, 9, 0, 0, 0]))


# --------------------------------------------------------------------------- #
# PCA-whitening
# --------------------------------------------------------------------------- #


def _data(rng, n=400, d=10):
    a = rng.standard_normal((d, d)) * np.linspace(3, 0.1, d)
    return (rng.standard_normal((n, d)) @ a + 5).astype(np.float32)


def test_full_whitening_gives_identity_covariance(rng):
    x = _data(rng)
    mean, P = learn_pca_whitening(x)
    assert mean.shape == (10,) and P.shape == (10, 10) and P.dtype == np.float32
    y = (x - mean) @ P
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(10), atol=1e-3)


def test_regularised_whitening_and_dim(rng):
    x = _data(rng)
    xc = x.astype(np.float64) - x.mean(axis=0)
    lam = np.sort(np.linalg.eigvalsh(np.cov(xc, rowvar=False)))[::-1]
    mean, P = learn_pca_whitening(x, dim=4, shrinkage="mean")
    _, P1 = learn_pca_whitening(x, dim=4, shrinkage=1.0)
    np.testing.assert_array_equal(P, P1)
    y = (x - mean) @ P
    expected = lam[:4] / (lam[:4] + lam.mean())
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.diag(expected), atol=1e-3)
    z = apply_pca_whitening(x, mean, P)
    assert z.shape == (400, 4)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # nested: the first 4 columns of the full projection
    _, Pfull = learn_pca_whitening(x, shrinkage=1.0)
    np.testing.assert_allclose(Pfull[:, :4], P, atol=1e-6)


def test_whitening_input_errors(rng):
    x = _data(rng)
    with pytest.raises(InputError, match="dim"):
        learn_pca_whitening(x, dim=11)
    with pytest.raises(InputError, match="shrinkage"):
        learn_pca_whitening(x, shrinkage="median")
    with pytest.raises(InputError, match="at least 2"):
        learn_pca_whitening(x[:1])
    mean, P = learn_pca_whitening(x, dim=3)
    with pytest.raises(InputError, match="dimension"):
        apply_pca_whitening(x[:, :5], mean, P)
