"""Embedding transforms: estimator contract for every kind, closed forms, losses, persistence,
and a quality sanity check on real ROxford5k LOPQ descriptors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.train.config import TrainConfig
from galleria.transforms.aesvc import AESVC, aesvc_loss, latent_constraints
from galleria.transforms.analysis import (
    cosine_similarity_stats,
    pairwise_cosines,
    plot_similarity_histograms,
)
from galleria.transforms.base import NotFittedError, Transform
from galleria.transforms.linear import PCA, learn_pca
from galleria.transforms.registry import (
    TRANSFORMS,
    create_transform,
    load_transform,
    transform_class,
)
from galleria.transforms.ss2d import (
    SS2D,
    default_sizes,
    nested_loss,
    offdiag_rows,
    similarity_kl,
    similarity_mse,
)
from galleria.validate import l2_normalize


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is fastest and immune to a busy machine (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FP = "toy-model@0123456789abcdef"
D, d = 24, 16
FAST = {"epochs": 2, "batch_size": 64}
FAST_TRAIN = {"train": TrainConfig(epochs=2, batch_size=64)}
TORCH_KINDS = {"aesvc", "ss2d", "ssd", "matryoshka"}


def make_params(kind: str) -> dict:
    params: dict = {} if kind == "center" else {"dim": d}
    if kind in TORCH_KINDS:
        params.update(FAST)
    if kind in ("ss2d", "ssd", "matryoshka"):
        params["teacher_params"] = dict(FAST)
        params["sizes"] = [4, 8, 16]
    return params


@pytest.fixture(scope="module")
def toy() -> np.ndarray:
    """``(300, 24)`` anisotropic Gaussian rows (a few dominant directions)."""
    rng = np.random.default_rng(0)
    scales = np.geomspace(4.0, 0.2, D)
    return (rng.normal(size=(300, D)) * scales + 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(toy: np.ndarray) -> dict[str, Transform]:
    return {k: create_transform(k, **make_params(k)).fit(toy, fingerprint=FP) for k in TRANSFORMS}


# ------------------------------------------------------------------ contract
def test_registry_lists_every_kind_with_a_description():
    assert set(TRANSFORMS) == {
        "center", "pca", "pca-whiten", "pca-whiten-reg", "aesvc", "ss2d", "ssd", "matryoshka",
    }
    assert all(isinstance(v, str) and v for v in TRANSFORMS.values())
    with pytest.raises(InputError, match="unknown transform"):
        create_transform("umap")
    with pytest.raises(InputError, match="bad parameters"):
        create_transform("pca", nonsense=1)


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_init_only_stores_params(kind: str):
    t = create_transform(kind, **make_params(kind))
    assert not t.is_fitted
    assert not [a for a in vars(t) if a.endswith("_")]
    params = t.get_params()
    assert set(params) == set(type(t)._param_names())
    json.dumps(t.json_params())  # JSON-able
    with pytest.raises(NotFittedError):
        t.transform(np.ones((2, D), np.float32))
    with pytest.raises(NotFittedError):
        _ = t.output_fingerprint


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_fit_transform_contract(kind: str, toy: np.ndarray, fitted: dict[str, Transform]):
    t = fitted[kind]
    assert t.input_dim_ == D and t.input_fingerprint_ == FP
    out_dim = D if kind == "center" else d
    assert t.output_dim_ == out_dim
    Y = t.transform(toy[:50], fingerprint=FP)
    assert Y.shape == (50, out_dim) and Y.dtype == np.float32 and Y.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1.0, atol=1e-5)
    # input rows are L2-normalised first: the scale of the input does not matter
    np.testing.assert_allclose(t.transform(toy[:50] * 7.0), Y, atol=1e-5)
    # a single vector is a batch of one
    assert t.transform(toy[0]).shape == (1, out_dim)
    fit_ret = create_transform(kind, **make_params(kind))
    assert fit_ret.fit(toy) is fit_ret


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_fingerprint_chains_the_model(kind: str, fitted: dict[str, Transform]):
    t = fitted[kind]
    fp = t.output_fingerprint
    saved_kind = "pca-whiten" if kind == "pca-whiten-reg" else kind
    assert fp.startswith(f"{FP}|{saved_kind}@")
    assert t.output_fingerprint == fp  # stable
    assert len({fitted[k].output_fingerprint for k in TRANSFORMS}) == len(TRANSFORMS)


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_wrong_model_or_dimension_is_a_clear_error(kind: str, toy, fitted):
    t = fitted[kind]
    with pytest.raises(CompatibilityError) as exc:
        t.transform(toy[:5], fingerprint="other-model@ffff")
    assert FP in str(exc.value) and "other-model@ffff" in str(exc.value)
    with pytest.raises(CompatibilityError) as exc:
        t.transform(np.ones((5, D + 3), np.float32))
    assert f"{D}-d" in str(exc.value) and f"{D + 3}-d" in str(exc.value)
    with pytest.raises(InputError, match="NaN"):
        t.transform(np.full((2, D), np.nan, np.float32))
    with pytest.raises(InputError):
        t.transform(toy[:5], dim=t.output_dim_ + 1)


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_save_load_round_trip(kind: str, toy, fitted, tmp_path: Path):
    t = fitted[kind]
    t.save(tmp_path / kind)
    header = json.loads((tmp_path / kind / "header.json").read_text())
    assert header["type"] == "transform" and header["format_version"] == 1
    assert header["fingerprint"] == FP and header["output_fingerprint"] == t.output_fingerprint
    assert header["input_dim"] == D and header["output_dim"] == t.output_dim_
    assert not list((tmp_path / kind).glob("*.pkl"))
    loaded = load_transform(tmp_path / kind, fingerprint=FP)
    assert type(loaded) is type(t) and loaded.output_fingerprint == t.output_fingerprint
    np.testing.assert_array_equal(loaded.transform(toy), t.transform(toy))
    with pytest.raises(CompatibilityError):
        load_transform(tmp_path / kind, fingerprint="other-model@ffff")


@pytest.mark.parametrize("kind", sorted(TORCH_KINDS))
def test_seeded_training_is_deterministic(kind: str, toy, fitted):
    again = create_transform(kind, **make_params(kind)).fit(toy, fingerprint=FP)
    np.testing.assert_array_equal(again.transform(toy), fitted[kind].transform(toy))
    assert again.output_fingerprint == fitted[kind].output_fingerprint
    other = create_transform(kind, **{**make_params(kind), "seed": 1}).fit(toy, fingerprint=FP)
    assert not np.array_equal(other.transform(toy), fitted[kind].transform(toy))


def test_nested_dims(toy, fitted):
    for kind in ("pca", "pca-whiten", "pca-whiten-reg", "ss2d", "matryoshka"):
        t = fitted[kind]
        assert t.output_dims is None
        full = t.transform(toy, normalize=False)
        np.testing.assert_allclose(
            t.transform(toy, dim=4), l2_normalize(full[:, :4]), atol=1e-6
        )
        assert t.output_fingerprint_at(4) == t.output_fingerprint + "#d4"
    ssd = fitted["ssd"]
    assert ssd.output_dims == [4, 8, 16] and ssd.transform(toy, dim=8).shape == (300, 8)
    with pytest.raises(InputError, match="trained for"):
        ssd.transform(toy, dim=5)
    with pytest.raises(InputError, match="not nested"):
        fitted["aesvc"].transform(toy, dim=4)


def test_unknown_fingerprint_is_not_chained(toy):
    t = create_transform("center").fit(toy)
    assert t.input_fingerprint_ is None and t.output_fingerprint.startswith("center@")
    t.transform(toy, fingerprint="anything@1")  # nothing to check against


def test_corrupted_or_foreign_artifacts_are_rejected(toy, fitted, tmp_path: Path):
    t = fitted["pca"]
    t.save(tmp_path / "p")
    header = json.loads((tmp_path / "p" / "header.json").read_text())
    header["output_fingerprint"] = "tampered"
    (tmp_path / "p" / "header.json").write_text(json.dumps(header))
    with pytest.raises(FormatError, match="does not match"):
        load_transform(tmp_path / "p")
    with pytest.raises(FormatError):
        load_transform(tmp_path / "missing")
    fitted["center"].save(tmp_path / "c")
    with pytest.raises(FormatError, match="'center'"):
        PCA.load(tmp_path / "c")
    header = json.loads((tmp_path / "c" / "header.json").read_text())
    header["format_version"] = 99
    (tmp_path / "c" / "header.json").write_text(json.dumps(header))
    with pytest.raises(FormatError, match="format version"):
        load_transform(tmp_path / "c")


def test_progress_factory_reaches_the_training_loop(toy):
    bars: list[dict] = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            bars.append(self.kw)

        def update(self, n=1):
            self.kw["n"] = self.kw.get("n", 0) + n

        def close(self):
            self.kw["closed"] = True

    SS2D(dim=8, sizes=[4, 8], teacher_params=FAST, **FAST_TRAIN).fit(toy, progress=Bar)
    assert [b["desc"].split()[0] for b in bars] == ["aesvc", "ss2d"]  # teacher, then student
    assert all(b["n"] == b["total"] and b["closed"] for b in bars)


def test_closed_form_transforms_do_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "from galleria.transforms.registry import create_transform, load_transform\n"
        "from galleria.transforms.analysis import cosine_similarity_stats\n"
        "X = np.random.default_rng(0).random((50, 8))\n"
        "for k in ('center', 'pca', 'pca-whiten', 'pca-whiten-reg'):\n"
        "    create_transform(k).fit(X).transform(X)\n"
        "cosine_similarity_stats(X)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ closed forms
def test_center_gives_zero_mean(toy, fitted):
    Y = fitted["center"].transform(toy, normalize=False)
    np.testing.assert_allclose(Y.mean(axis=0), 0.0, atol=1e-6)


def test_pca_matches_svd_and_is_nested(toy):
    X = l2_normalize(toy)
    Xc = X.astype(np.float64) - X.mean(axis=0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    t = create_transform("pca", dim=8).fit(toy)
    Y = t.transform(toy, normalize=False)
    ref = Xc @ vt[:8].T
    np.testing.assert_allclose(np.abs(Y), np.abs(ref), atol=1e-5)  # up to sign
    np.testing.assert_allclose(t.explained_variance_, s[:8] ** 2 / (len(X) - 1), rtol=1e-4)
    full = create_transform("pca", dim=16).fit(toy)
    np.testing.assert_allclose(full.transform(toy, dim=8), t.transform(toy), atol=1e-6)


def test_pca_whiten_gives_identity_covariance_on_fit_data(toy, fitted):
    Y = fitted["pca-whiten"].transform(toy, normalize=False).astype(np.float64)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), np.eye(d), atol=1e-4)


def test_regularised_whitening_divides_by_eigenvalue_plus_mean(toy, fitted):
    reg = fitted["pca-whiten-reg"]
    assert reg.get_params()["shrinkage"] == "mean"
    _, lam, _ = learn_pca(l2_normalize(toy))
    Y = reg.transform(toy, normalize=False).astype(np.float64)
    expected = lam[:d] / (lam[:d] + lam.mean())
    np.testing.assert_allclose(np.var(Y, axis=0, ddof=1), expected, rtol=1e-3)
    with pytest.raises(InputError):
        create_transform("pca-whiten", shrinkage=-1).fit(toy)


# ------------------------------------------------------------------ losses
def test_latent_constraints_match_numpy():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(64, 5)) * [1, 2, 3, 4, 5] + [0, 1, 0, -1, 2]
    C = np.cov(z, rowvar=False)
    cov, var, mean = latent_constraints(torch.tensor(z))
    off = C - np.diag(np.diag(C))
    assert float(cov) == pytest.approx((off**2).sum())
    assert float(var) == pytest.approx(np.mean((np.diag(C) - 1) ** 2))
    assert float(mean) == pytest.approx(np.mean(z.mean(axis=0) ** 2))
    cov_full, _, _ = latent_constraints(torch.tensor(z), cov_diagonal=True)
    assert float(cov_full) == pytest.approx((C**2).sum())
    x = torch.tensor(rng.normal(size=(64, 3)))
    loss, parts = aesvc_loss(x, torch.tensor(z), x + 1.0, w_rec=2, w_cov=0, w_var=0, w_mean=0)
    assert float(loss) == pytest.approx(2.0) and parts["rec"] == pytest.approx(1.0)


def test_similarity_losses_match_a_direct_computation():
    rng = np.random.default_rng(2)
    A = l2_normalize(rng.normal(size=(6, 4)).astype(np.float32)).astype(np.float64)
    B = l2_normalize(rng.normal(size=(6, 4)).astype(np.float32)).astype(np.float64)
    St, Ss = A @ A.T, B @ B.T
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_array_equal(offdiag_rows(torch.tensor(St)).numpy(), St[off].reshape(6, 5))
    t = 0.1

    def softmax(M):
        e = np.exp(M / t - (M / t).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    P, Q = softmax(St[off].reshape(6, 5)), softmax(Ss[off].reshape(6, 5))
    kl = np.mean(np.sum(P * np.log(P / Q), axis=1))
    assert float(similarity_kl(torch.tensor(St), torch.tensor(Ss), t)) == pytest.approx(kl)
    assert float(similarity_kl(torch.tensor(St), torch.tensor(St), t)) == pytest.approx(0, abs=1e-9)
    mse = np.mean((St[off] - Ss[off]) ** 2)
    assert float(similarity_mse(torch.tensor(St), torch.tensor(Ss))) == pytest.approx(mse)
    total, parts = nested_loss(
        torch.tensor(St), torch.tensor(A), [2, 4], [1.0, 0.5], similarity_mse
    )
    assert parts["d4"] == pytest.approx(0, abs=1e-12)
    assert float(total) == pytest.approx(parts["d2"])
    assert default_sizes(128) == [16, 32, 64, 128] and default_sizes(100) == [16, 32, 64, 100]
    assert default_sizes(8) == [8]


# ------------------------------------------------------------------ teachers
def test_ss2d_reuses_a_fitted_teacher_and_checks_its_model(toy, fitted):
    teacher = fitted["aesvc"]
    s = SS2D(dim=d, sizes=[8, 16], teacher=teacher, **FAST_TRAIN).fit(toy, fingerprint=FP)
    assert s.teacher_fingerprint_ == teacher.output_fingerprint
    assert s.json_params()["teacher"]["output_fingerprint"] == teacher.output_fingerprint
    with pytest.raises(CompatibilityError):
        SS2D(dim=d, teacher=teacher, **FAST_TRAIN).fit(toy, fingerprint="other-model@ffff")


def test_ss2d_accepts_a_callable_or_a_kind_as_teacher(toy):
    s = SS2D(dim=8, sizes=[8], teacher=lambda X: X[:, :8], **FAST_TRAIN).fit(toy)
    assert s.teacher_fingerprint_ is None and s.json_params()["teacher"]["callable"]
    s2 = SS2D(dim=8, sizes=[4, 8], teacher="pca-whiten", **FAST_TRAIN).fit(toy, fingerprint=FP)
    assert "|pca-whiten@" in s2.teacher_fingerprint_
    with pytest.raises(InputError, match="largest size"):
        SS2D(dim=8, sizes=[4, 16], **FAST_TRAIN).fit(toy)


def test_aesvc_rejects_unknown_input_scale(toy):
    with pytest.raises(InputError, match="input_scale"):
        AESVC(dim=4, input_scale="minmax", **FAST_TRAIN).fit(toy)
    assert transform_class("aesvc") is AESVC


# ------------------------------------------------------------------ analysis
def test_cosine_similarity_stats_match_brute_force(toy):
    X = l2_normalize(toy[:40]).astype(np.float64)
    S = X @ X.T
    vals = S[np.triu_indices(40, 1)]
    stats = cosine_similarity_stats(toy[:40], sample=None)
    assert stats["mean"] == pytest.approx(vals.mean()) and stats["n_pairs"] == 780
    assert stats["variance"] == pytest.approx(vals.var()) and stats["n_rows"] == 40
    a = pairwise_cosines(toy, sample=50, seed=3)
    assert a.size == 50 * 49 // 2 and np.array_equal(a, pairwise_cosines(toy, sample=50, seed=3))


def test_histogram_png(toy, fitted, tmp_path: Path):
    out = plot_similarity_histograms(
        {"raw": toy, "pca-whiten": fitted["pca-whiten"].transform(toy)}, tmp_path / "h.png"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError):
        plot_similarity_histograms({}, tmp_path / "x.png")


# ------------------------------------------------------------------ real data
@pytest.mark.shared
def test_aesvc_on_real_lopq_descriptors_flattens_the_similarity_distribution(require_shared):
    """ROxford5k LOPQ gallery (4993 x 128 real CNN descriptors), no labels used.

    The latent must satisfy the AE-SVC constraints approximately (decorrelated,
    unit variance, mean-centred) and the cosine-similarity variance must drop
    (raw: about 0.035; a full run gives about 0.017 at d=64).
    """
    require_shared("oxford5k_lopq128")
    require_shared("revisitop")
    from galleria.eval.datasets import load_task

    G, _ = load_task("roxford5k-lopq").vectors()
    assert G.shape == (4993, 128)
    t = AESVC(dim=64, train=TrainConfig(max_steps=1000, epochs=100, batch_size=256,
                                             patience=5)).fit(G)
    raw_var = cosine_similarity_stats(G)["variance"]
    out_var = cosine_similarity_stats(t.transform(G))["variance"]
    assert out_var < 0.75 * raw_var
    Z = t.transform(G, normalize=False).astype(np.float64)
    sd = Z.std(axis=0)
    corr = np.corrcoef(Z, rowvar=False)[~np.eye(64, dtype=bool)]
    assert np.abs(corr).mean() < 0.12 and np.abs(corr).max() < 0.6  # near-diagonal covariance
    assert sd.min() > 0.8 and sd.max() < 1.2  # unit variance
    assert (np.abs(Z.mean(axis=0)) / sd).max() < 0.6  # mean-centred
