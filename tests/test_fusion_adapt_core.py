"""The label-free query adaptation's core (pure numpy): ridge with a prior against the closed
form, additive moments (a fold is the total minus its rows), reciprocal ranks against a
sort, the choice on pseudo-queries (a map that fits the gallery is chosen; a gallery where
the light model is better answers from it), the artifact's digest checks."""

from __future__ import annotations

import numpy as np
import pytest

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.fusion.adapt import (
    AdaptConfig,
    FitData,
    Moments,
    RidgeSolver,
    decide,
    fit_adaptation,
    folds_of,
    normalize,
    reciprocal_ranks,
)
from galleria.fusion.adaptation import QueryAdaptation


def test_ridge_with_prior_is_the_closed_form(rng):
    x = rng.standard_normal((80, 6))
    t = rng.standard_normal((80, 3))
    w0 = rng.standard_normal((6, 3))
    for prior in (None, w0):
        w, b = RidgeSolver(Moments.of(x, t)).solve(0.5, prior)
        xc, tc = x - x.mean(0), t - t.mean(0)
        lam = 0.5 * np.trace(xc.T @ xc) / 6
        p = np.zeros((6, 3)) if prior is None else prior
        # argmin |xc W - tc|^2 + lam |W - p|^2
        ref = np.linalg.solve(xc.T @ xc + lam * np.eye(6), xc.T @ tc + lam * p)
        np.testing.assert_allclose(w, ref, atol=1e-9)
        np.testing.assert_allclose(b, t.mean(0) - x.mean(0) @ ref, atol=1e-9)
    # a huge ridge returns the prior's linear part; a tiny one least squares
    w, _ = RidgeSolver(Moments.of(x, t)).solve(1e9, w0)
    np.testing.assert_allclose(w, w0, atol=1e-6)
    w, _ = RidgeSolver(Moments.of(x, t)).solve(1e-12)
    ls = np.linalg.lstsq(np.c_[x, np.ones(80)], t, rcond=None)[0][:6]
    np.testing.assert_allclose(w, ls, atol=1e-6)


def test_moments_are_additive(rng):
    x, t = rng.standard_normal((50, 4)), rng.standard_normal((50, 2))
    whole = Moments.of(x, t)
    part = whole - Moments.of(x[10:20], t[10:20])
    keep = np.r_[0:10, 20:50]
    ref = Moments.of(x[keep], t[keep])
    for a, b in ((part.sx, ref.sx), (part.xx, ref.xx), (part.xt, ref.xt)):
        np.testing.assert_allclose(a, b, atol=1e-9)
    assert part.n == ref.n == 40
    with pytest.raises(InputError):
        RidgeSolver(Moments.of(x[:1], t[:1]))


def test_reciprocal_ranks_against_a_sort(rng):
    g = normalize(rng.standard_normal((40, 5)))
    q = normalize(rng.standard_normal((30, 5)))
    truth = rng.integers(0, 40, 30)
    rr = reciprocal_ranks(q, g, truth, batch=7)
    sc = q @ g.T
    for i in range(30):
        order = np.argsort(-sc[i], kind="stable")
        assert rr[i] == pytest.approx(1.0 / (1 + int(np.where(order == truth[i])[0][0])))


def test_folds_are_seeded_and_cover_the_pseudo_rows():
    p = np.arange(10, 40)
    f1, f2 = folds_of(p, 3, 0), folds_of(p[::-1], 3, 0)
    assert [a.tolist() for a in f1] == [a.tolist() for a in f2]
    assert sorted(np.concatenate(f1).tolist()) == p.tolist()
    assert folds_of(p, 3, 1)[0].tolist() != f1[0].tolist()


def _gallery(rng, n=240, dim_x=24, d=12, views=2, noise=0.15, light_noise=0.15):
    """Items with a latent z; the light vector and the fused vector are two linear views of
    z; a phone-like view adds noise to the light vector."""
    z = rng.standard_normal((n, 16))
    a = rng.standard_normal((16, dim_x))
    c = rng.standard_normal((16, d))
    x = normalize(z @ a)
    g = normalize(z @ c + noise * rng.standard_normal((n, d)))
    vi = np.repeat(np.arange(n), views)
    xv = normalize(x[vi] + light_noise * rng.standard_normal((len(vi), dim_x)))
    return x, g, xv, vi


def test_a_map_fitted_on_the_gallery_beats_a_wrong_trained_map(rng):
    x, g, xv, vi = _gallery(rng)
    wrong = (rng.standard_normal((x.shape[1], g.shape[1])), np.zeros(g.shape[1]))
    cfg = AdaptConfig(pseudo_items=60, min_items=4)
    data = FitData(g, x, xv, vi, np.arange(0, 240, 4))
    fit = fit_adaptation(data, wrong, cfg)
    assert fit.chosen.name == "ridge"
    assert fit.chosen.score["mrr"] > fit.trained["mrr"] + 20
    assert fit.cosine["adapted"] > 0.9 > fit.cosine["trained"]
    # every candidate was scored on the same 60 items x 2 views, fitted without them
    assert {c.score["n"] for c in fit.candidates} == {120}
    assert len(fit.candidates) == 1 + len(cfg.ridges) * len(cfg.priors)
    # deterministic
    again = fit_adaptation(FitData(g, x, xv, vi, np.arange(0, 240, 4)), wrong, cfg)
    np.testing.assert_array_equal(again.w, fit.w)
    # a trained map that is already right is kept or barely moved
    w_true = RidgeSolver(Moments.of(np.r_[x, xv], np.r_[g, g[vi]])).solve(1e-3)
    good = fit_adaptation(data, w_true, cfg)
    assert good.chosen.score["mrr"] >= good.trained["mrr"] - 0.5


def test_the_light_model_answers_where_the_fused_space_is_worse(rng):
    x, g, xv, vi = _gallery(rng, noise=3.0, light_noise=0.05)  # fused vectors mostly noise
    prior = (np.zeros((x.shape[1], g.shape[1])), np.zeros(g.shape[1]))
    fit = fit_adaptation(FitData(g, x, xv, vi, np.arange(0, 240, 3)), prior,
                         AdaptConfig(pseudo_items=80, min_items=4, decide_on="self"),
                         trained_candidate=False)
    assert fit.answer == "light" and fit.light["mrr"] > fit.chosen.score["mrr"]
    assert "its own vectors answer" in fit.reason
    assert all(c.name == "ridge" for c in fit.candidates)


def test_decide_margin():
    assert decide({"mrr": 50.0, "n": 10}, {"mrr": 50.0, "n": 10})[0] == "fused"
    assert decide({"mrr": 50.0, "n": 10}, {"mrr": 49.0, "n": 10}, margin=2.0)[0] == "light"


def test_bad_inputs_are_refused(rng):
    x, g, xv, vi = _gallery(rng, n=20)
    with pytest.raises(InputError, match="pseudo"):
        FitData(g, x, xv, vi, np.array([1, 1]))
    with pytest.raises(InputError, match="views"):
        FitData(g, x, xv[:, :3], vi, np.array([1, 2]))
    with pytest.raises(InputError, match="trained map"):
        fit_adaptation(FitData(g, x, xv, vi, np.arange(10)), (np.zeros((3, 3)), np.zeros(3)),
                       AdaptConfig(min_items=4))
    with pytest.raises(InputError):
        AdaptConfig(folds=1)
    with pytest.raises(InputError):
        AdaptConfig(priors=("other",))
    assert AdaptConfig.from_dict(AdaptConfig(views=3).to_dict()) == AdaptConfig(views=3)


def test_adaptation_artifact_digest_and_refusals(rng, tmp_path):
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    a = QueryAdaptation(model_fingerprint="fusion-4@x", light_fingerprint="fusion-4@x|light@y",
                        w=w, b=b, params={"k": 1}, info={"answer": "fused"})
    out = a.save(tmp_path / a.digest)
    back = QueryAdaptation.load(out, digest=a.digest, model_fingerprint="fusion-4@x")
    np.testing.assert_array_equal(back.w, w)
    assert back.info == {"answer": "fused"} and back.params == {"k": 1}
    assert a.save(out) == out  # same digest: kept
    with pytest.raises(CompatibilityError, match="records"):
        QueryAdaptation.load(out, digest="0" * 16)
    with pytest.raises(CompatibilityError, match="fusion-4@other"):
        QueryAdaptation.load(out, model_fingerprint="fusion-4@other")
    # an edited map is refused
    from safetensors.numpy import save

    (out / "map.safetensors").write_bytes(save({"w": w + 1, "b": b}))
    with pytest.raises(FormatError, match="digest"):
        QueryAdaptation.load(out)
    with pytest.raises(FormatError):
        QueryAdaptation(model_fingerprint="a", light_fingerprint="b", w=w, b=b[:2])
    np.testing.assert_allclose(a.apply(np.ones((2, 8))), np.ones((2, 8)) @ w + b, rtol=1e-5)


def test_the_one_decision_says_which_space_of_a_fused_gallery_answers_and_why():
    from pathlib import Path

    from galleria.decision.choose import FUSION_KEY, SearchRequest, choose
    from galleria.store.state import GalleryState, SpaceState

    fused, light = "fused@1", "fused@1|light@2"
    spaces = (SpaceState(fused, "global", 8, 100, 1, "exact"),
              SpaceState(light, "global", 4, 100, 1, "exact"))
    for answer, space in (("light", light), ("fused", fused)):
        rec = {"answer": answer, "space": space, "reason": f"{answer} scored higher"}
        st = GalleryState(Path("G"), spaces, space, {"primary_space": space, FUSION_KEY: rec})
        spec = choose(st, SearchRequest.of())
        assert (spec.kind, spec.space) == ("plain", space)
        assert spec.reason == f"gallery spaces; fusion: {answer}: {answer} scored higher"
        assert spec.to_dict()["reason"] == spec.reason
        # sharded: the same space, the same why
        assert choose(st, SearchRequest.of(sharded=True)).reason.endswith(spec.reason[15:])
        # asking for the other space is plain "asked", no fusion story
        other = fused if space == light else light
        assert choose(st, SearchRequest.of(space=other)).reason == "asked"
    # a refit (new record, same space) is a new spec: a service reloads its query model
    a = GalleryState(Path("G"), spaces, fused, {FUSION_KEY: {"space": fused, "reason": "x"}})
    b = GalleryState(Path("G"), spaces, fused, {FUSION_KEY: {"space": fused, "reason": "y"}})
    assert choose(a, SearchRequest.of()) != choose(b, SearchRequest.of())
    # no fusion record: the reason is unchanged
    plain = GalleryState(Path("G"), spaces, fused, {})
    assert choose(plain, SearchRequest.of()).reason == "gallery spaces"


def test_consensus_neighbours_and_their_average_precision_against_brute_force(rng):
    from galleria.fusion.adapt import consensus_neighbours, neighbour_ap

    g = normalize(rng.standard_normal((40, 6)))
    x = normalize(g @ rng.standard_normal((6, 5)) + 0.3 * rng.standard_normal((40, 5)))
    rows = np.array([0, 7, 19])
    nbs = consensus_neighbours(g, x, rows, 8)
    for r, nb in zip(rows, nbs, strict=True):
        top = [set(np.argsort(-np.where(np.arange(40) == r, -np.inf, sp @ sp[r]))[:8].tolist())
               for sp in (g, x)]
        assert set(nb.tolist()) == top[0] & top[1] and r not in nb
    q = normalize(g[rows] + 0.1 * rng.standard_normal((3, 6)))
    ap = neighbour_ap(q, g, rows, nbs)
    for i, (r, nb) in enumerate(zip(rows, nbs, strict=True)):
        order = [j for j in np.argsort(-(g @ q[i])) if j != r]
        hits = np.isin(order, nb)
        ref = np.mean([hits[:k + 1].sum() / (k + 1) for k in np.flatnonzero(hits)])
        assert ap[i] == pytest.approx(ref)
    assert np.isnan(neighbour_ap(q[:1], g, rows[:1], [np.zeros(0, np.int64)]))[0]
    with pytest.raises(InputError):
        AdaptConfig(decide_on="labels")


def test_gallery_whitening_whitens_and_the_domain_rule_picks_each_space():
    from galleria.fusion.adapt import domain_stats, gallery_whitening, select, whitened_map

    rng = np.random.default_rng(3)
    g = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8)) + 2.0
    p, c = gallery_whitening(g, shrink=0.0)
    z = g @ p + c
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(8), atol=1e-8)
    # the light map into it is the closed-form ridge on centred rows
    x = rng.standard_normal((200, 5))
    w, b = whitened_map(g, x, np.zeros((0, 5)), np.zeros(0, np.int64), (p, c), 0.3)
    gw = z / np.linalg.norm(z, axis=1, keepdims=True)
    xc, tc = x - x.mean(0), gw - gw.mean(0)
    lam = 0.3 * np.trace(xc.T @ xc) / 5
    np.testing.assert_allclose(w, np.linalg.solve(xc.T @ xc + lam * np.eye(5), xc.T @ tc),
                               atol=1e-9)
    np.testing.assert_allclose(b, gw.mean(0) - x.mean(0) @ w, atol=1e-9)
    # a centred gallery is of the model's domain; an offset light space is homogeneous
    d = domain_stats(g - g.mean(0), x + 5.0)
    assert d["ratio"] < 0.2 and d["light_mean"] > 0.9
    cfg = AdaptConfig()
    fused, light = {"mrr": 10.0, "n": 5}, {"mrr": 90.0, "n": 5}
    assert select(d, fused, light, cfg)[0] == "fused"
    assert select({**d, "ratio": 0.9}, fused, light, cfg)[0] == "whitened"
    out = {**d, "ratio": 0.9, "light_mean": 0.5}
    assert select(out, light, fused, cfg)[0] == "light"  # out of domain: the light model
    pq = AdaptConfig(out_of_domain="pseudo-queries")
    assert select(out, fused, light, pq)[0] == "light"
    assert select(out, light, fused, pq)[0] == "fused"
