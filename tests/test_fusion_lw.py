"""The closed-form start (galleria.fusion.anchor): learned whitening carries to classes it
never saw where PCA does not, input selection drops a pure-noise input, the query map
keeps the query model's own block exact, and the default recipe wires it all in."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import InputError
from galleria.fusion.anchor import (
    _Chooser,
    _nrm,
    _ridge,
    choose_start,
    held_out_map,
    learned_whitening,
    pca_projection,
)
from galleria.fusion.mixer import InputSpec, build_mixer, mix
from galleria.fusion.train import FusionRecipe, TrainingData, fit_fusion
from test_fusion_train import RECIPE, synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nuisance_set(rng, n_classes, per, dim=40):
    """Class code in 8 weak directions; a strong per-image nuisance in 16 others."""
    y = np.repeat(np.arange(n_classes), per)
    code = rng.standard_normal((n_classes, 8))
    mix_ = np.linalg.qr(rng.standard_normal((dim, dim)))[0]  # hide the split by a rotation
    x = np.zeros((len(y), dim))
    x[:, :8] = 0.5 * code[y] + 0.2 * rng.standard_normal((len(y), 8))
    x[:, 8:24] = 1.0 * rng.standard_normal((len(y), 16))
    return _nrm(x @ mix_), y, mix_


def test_learned_whitening_carries_to_unseen_classes_where_pca_does_not():
    rng = np.random.default_rng(0)
    x, y, rot = _nuisance_set(rng, 40, 6)
    rng_t = np.random.default_rng(1)
    y_t = np.repeat(np.arange(30), 6)  # other classes, same nuisance
    code = rng_t.standard_normal((30, 8))
    xt = np.zeros((len(y_t), 40))
    xt[:, :8] = 0.5 * code[y_t] + 0.2 * rng_t.standard_normal((len(y_t), 8))
    xt[:, 8:24] = 1.0 * rng_t.standard_normal((len(y_t), 16))
    xt = _nrm(xt @ rot)
    scores = {}
    for name, (mu, p) in {"pca": pca_projection(x, 8),
                          "lw": learned_whitening(x, y, 8, 0.1)}.items():
        g = _nrm((xt - mu) @ p.T)
        scores[name] = held_out_map(g, g, y_t, True)
    assert scores["lw"] > scores["pca"] + 0.3, scores


def test_learned_whitening_rank_and_fallback():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 30))
    y = np.repeat(np.arange(5), 2)
    _, p = learned_whitening(x, y, 16, 0.3)
    assert p.shape == (16, 30)
    assert np.abs(p[9:]).max() == 0.0  # 10 centred rows span 9 directions: the rest are 0
    assert np.linalg.matrix_rank(p[:9]) == 9
    _, p1 = learned_whitening(x, np.arange(10), 8, 0.3)  # one image per class
    _, p2 = pca_projection(x, 8)
    np.testing.assert_allclose(p1, p2)
    with pytest.raises(InputError, match="alpha"):
        learned_whitening(x, y, 8, 1.5)


def _inputs(rng, n_classes=30, per=5):
    y = np.repeat(np.arange(n_classes), per)
    code = rng.standard_normal((n_classes, 12))
    a = code[y][:, :6] @ rng.standard_normal((6, 20)) + 1.5 * rng.standard_normal((len(y), 20))
    b = code[y][:, 6:] @ rng.standard_normal((6, 14)) + 1.5 * rng.standard_normal((len(y), 14))
    noise = rng.standard_normal((len(y), 24))
    return [_nrm(a), _nrm(b), _nrm(noise)], y


def test_selection_drops_a_pure_noise_input_and_the_anchor_ignores_it():
    feats, y = _inputs(np.random.default_rng(0))
    tr, va = np.arange(100), np.arange(100, 150)  # classes 0-19 | 20-29
    st = choose_start(feats, y, tr, va, d=30, names=["a", "b", "noise"])
    assert st.keep == [0, 1], st.val
    assert st.info(["a", "b", "noise"])["kept_inputs"] == ["a", "b"]
    assert np.abs(st.proj[:, 34:]).max() == 0.0  # the noise columns
    specs = [InputSpec("a", "a@1", "global", 20), InputSpec("b", "b@1", "global", 14),
             InputSpec("noise", "n@1", "global", 24)]
    m = build_mixer("mlp", specs, d=30, anchor=True)
    m.set_projection(st.mu, st.proj)
    other = [feats[0], feats[1], _nrm(np.random.default_rng(9).standard_normal((150, 24)))]
    np.testing.assert_allclose(mix(m, feats), mix(m, other), atol=1e-6)
    keep_all = choose_start(feats, y, tr, va, d=30, select=False)
    assert keep_all.keep == [0, 1, 2]


def test_learned_whitening_is_the_generalised_eigenproblem():
    from scipy.linalg import eigh

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(12), 5)
    x = rng.standard_normal((60, 9)) + rng.standard_normal((12, 9))[y]
    _, p = learned_whitening(x, y, 4, 0.2)
    xc = x - x.mean(0)
    means = np.stack([x[y == c].mean(0) for c in range(12)])
    w = x - means[y]
    s_w, s_t = w.T @ w / 60, xc.T @ xc / 60
    s_w = 0.8 * s_w + 0.2 * np.trace(s_w) / 9 * np.eye(9)
    c2 = (p @ s_w @ p.T)[0, 0]
    np.testing.assert_allclose(p @ s_w @ p.T, c2 * np.eye(4), atol=1e-8 * c2)
    want = eigh(s_t, s_w, eigvals_only=True)[::-1][:4]
    np.testing.assert_allclose(np.diag(p @ s_t @ p.T) / c2, want, rtol=1e-8)
    out = np.linalg.norm(xc @ p.T, axis=1).mean()  # scaled to the centred rows' mean norm
    np.testing.assert_allclose(out, np.linalg.norm(xc, axis=1).mean(), rtol=1e-10)


def test_query_map_keeps_the_own_block_exact_and_predicts_the_others():
    feats, y = _inputs(np.random.default_rng(1))
    tr, va = np.arange(100), np.arange(100, 150)
    pooled = np.stack([feats[0], _nrm(feats[0] + 0.05)], axis=1)  # (N, 2 views, 20)
    ch = _Chooser(feats[:2], y, tr, va, pooled, 0, "lw", 8, False)
    mu, p = ch.anchor([0, 1], 0.3)
    x0 = feats[0]
    w, b = _ridge(pooled[tr].reshape(-1, 20), np.repeat(feats[1][tr], 2, axis=0), 0.1)
    maps = {(r, lam): (a, c) for r, lam, a, c in ch.query_maps(mu, p, [0, 1], (0.1,), (0.0, 1.0))}
    a, c = maps[(0.1, 0.0)]  # lam 0: own block exact, the other at its training mean
    want = (np.hstack([x0, np.tile(feats[1][tr].mean(0), (150, 1))]) - mu) @ p.T
    np.testing.assert_allclose(x0 @ a.T + c, want, atol=1e-9)
    a, c = maps[(0.1, 1.0)]  # lam 1: the other block is the ridge prediction
    want = (np.hstack([x0, x0 @ w + b]) - mu) @ p.T
    np.testing.assert_allclose(x0 @ a.T + c, want, atol=1e-9)
    st = choose_start(feats[:2], y, tr, va, d=8, pooled=pooled, own=0)
    q = _nrm(feats[0][va] @ st.query_w.T + st.query_b)  # query -> fused gallery, held out
    g = _nrm((np.hstack(feats[:2])[va] - st.mu) @ st.proj.T)
    assert held_out_map(q, g, y[va], False) > 0.5
    with pytest.raises(InputError, match="own input"):
        choose_start(feats[:2], y, tr, va, d=8, pooled=pooled, own=1)  # 14-d, not 20-d


def test_instance_labels_score_an_augmented_view_and_no_split_uses_defaults():
    feats, _ = _inputs(np.random.default_rng(2))
    n = len(feats[0])
    rng = np.random.default_rng(5)
    pooled = np.stack([feats[0], _nrm(feats[0] + 0.3 * rng.standard_normal(feats[0].shape))], 1)
    st = choose_start(feats, np.arange(n), np.arange(100), np.arange(100, n), d=8,
                      pooled=pooled, own=0, inst=True)
    assert st.kind == "pca" and st.alpha is None  # no within-class scatter: PCA
    assert st.val["query_view"] == 1 and st.val["sym"] is None
    assert 0 in st.keep  # the own input is what the augmented view can be matched by
    y = np.repeat(np.arange(30), 5)
    st0 = choose_start(feats, y, np.arange(n), np.zeros(0, int), d=8, pooled=pooled, own=0)
    assert (st0.alpha, st0.ridge, st0.lam, st0.keep) == (0.6, 1.0, 1.0, [0, 1, 2])
    m = build_mixer("mlp", [InputSpec("a", "a@1", "global", 20)], d=8, anchor=True)
    with pytest.raises(InputError, match="anchor of this mixer"):
        m.set_projection(np.zeros(20), np.zeros((8, 21)))


@pytest.mark.slow  # default suite budget: 20-70 s on 2 cores under load
def test_default_recipe_starts_from_the_closed_form_and_drops_noise():
    d = synthetic(n_classes=48, per=4)
    rng = np.random.default_rng(3)
    noise = _nrm(rng.standard_normal((len(d.labels), 16))).astype(np.float32)
    data = TrainingData([*d.specs, InputSpec("noise", "n@1", "global", 16)],
                        [*d.features, noise], d.views, d.labels)
    short = {**RECIPE.to_dict(), "epochs": 2, "anchor": True, "distill": 1.0,
             "anchor_kind": "lw", "select_inputs": True, "query_init": "predict"}
    res = fit_fusion(data, FusionRecipe(**short))
    start = res.init["start"]
    assert start["anchor"] == "lw" and start["kept_inputs"] == ["a", "b"], start
    plain = fit_fusion(d, FusionRecipe(**{**RECIPE.to_dict(), "epochs": 2}))  # paper start
    h0, p0 = res.history[0], plain.history[0]
    assert h0.val_sym > p0.val_sym + 0.05 and h0.val_asym > p0.val_asym + 0.02
    assert abs(h0.score - start["val"]["score"]) < 1e-3  # epoch 0 is the chosen start


def test_recipe_fields_and_refusals():
    old_default = {k: v for k, v in FusionRecipe().to_dict().items()
                   if k not in ("anchor_kind", "select_inputs", "query_norm")}
    old_default["query_init"] = "regress"  # the stop-15 default, recorded before these fields
    r = FusionRecipe.from_dict(old_default)
    assert (r.anchor_kind, r.select_inputs, r.query_norm) == ("pca", False, False)
    assert "normalize" not in r.query_params("w") and FusionRecipe().query_params("w")["normalize"]
    with pytest.raises(InputError, match="anchored"):
        FusionRecipe(anchor=False)  # query_init predict needs the anchor
    with pytest.raises(InputError, match="anchor_kind"):
        FusionRecipe(anchor_kind="lda")


def test_start_options_as_a_config_or_as_keywords_give_the_same_start():
    from galleria.errors import InputError
    from galleria.fusion.anchor import StartOptions

    feats, y = _inputs(np.random.default_rng(0))
    tr, va = np.arange(100), np.arange(100, 150)
    by_kw = choose_start(feats, y, tr, va, d=30, select=False)
    by_cfg = choose_start(feats, y, tr, va, StartOptions(d=30, select=False))
    mixed = choose_start(feats, y, tr, va, StartOptions(d=8), d=30, select=False)
    for st in (by_cfg, mixed):
        np.testing.assert_array_equal(st.proj, by_kw.proj)
        assert st.keep == by_kw.keep
    with pytest.raises(InputError, match="no option colour"):
        choose_start(feats, y, tr, va, d=30, colour=1)
    with pytest.raises(InputError, match="StartOptions"):
        choose_start(feats, y, tr, va)  # d is required
