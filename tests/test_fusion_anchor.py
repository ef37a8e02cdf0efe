"""The anchored mixer (PCA start + gated mixer), the query's regression start and the
distillation term: what each starts from, that it is saved and reloaded, and that
the recipe records it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from galleria.errors import InputError
from galleria.fusion.mixer import AnchoredMixer, InputSpec, build_mixer, mix
from galleria.fusion.query_model import QueryTail, init_regression
from galleria.fusion.train import FusionRecipe, fit_fusion
from galleria.transforms.registry import create_transform
from test_fusion_train import RECIPE, synthetic

SPECS = [InputSpec("a", "a@1", "global", 12), InputSpec("b", "b@1", "global", 7)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(rng, n=40):
    """Stored member features: L2-normalised rows, as extractors store them."""
    out = []
    for s in SPECS:
        x = rng.standard_normal((n, s.dim))
        out.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return out


def test_a_new_anchored_mixer_outputs_the_pca_of_the_concatenation():
    rng = np.random.default_rng(0)
    train, test = _features(rng), _features(rng, 9)
    for kind in ("transformer", "mlp"):
        torch.manual_seed(0)
        m = build_mixer(kind, SPECS, d=8, layers=1, heads=2, anchor=True)
        assert isinstance(m, AnchoredMixer) and float(m.gate.detach()) == 0.0
        m.set_anchor(train)
        pca = create_transform("pca", dim=8).fit(np.hstack(train))
        want = pca.transform(np.hstack(test))
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(mix(m, test), want, atol=1e-5)
        with torch.no_grad():
            m.gate.fill_(0.5)  # once the gate opens, the mixer adds to the anchor
        assert np.abs(mix(m, test) - want).max() > 1e-2


def test_anchor_is_part_of_the_weights_and_never_trained():
    torch.manual_seed(0)
    m = build_mixer("transformer", SPECS, d=8, layers=1, heads=2, anchor=True)
    m.set_anchor(_features(np.random.default_rng(1)))
    sd = m.state_dict()
    assert {"anchor_mean", "anchor_proj", "gate"} <= set(sd)
    assert "anchor_proj" not in {n for n, _ in m.named_parameters()}
    torch.manual_seed(5)
    other = build_mixer("transformer", SPECS, d=8, layers=1, heads=2, anchor=True)
    other.load_state_dict(sd)
    x = _features(np.random.default_rng(2), 5)
    np.testing.assert_array_equal(mix(m, x), mix(other, x))


def test_regression_start_reproduces_a_linear_target():
    tail = QueryTail.__new__(QueryTail)
    torch.nn.Module.__init__(tail)
    tail.whiten = torch.nn.Linear(1280, 16)
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((3000, 1280)))
    w = rng.standard_normal((1280, 16)) / 40
    t = x @ w + 0.3
    cos = init_regression(tail, x, t, ridge=1e-6)
    assert cos > 0.999
    with torch.no_grad():
        out = tail.whiten(torch.from_numpy(x[:50].astype(np.float32))).numpy()
    np.testing.assert_allclose(out, t[:50], atol=0.05 * np.abs(t).max())
    with pytest.raises(InputError, match="regression to"):
        init_regression(tail, x[:, :10], t)  # 10-d features for a 1280-d layer


def test_recipe_records_new_fields_only_when_used():
    plain = FusionRecipe(anchor=False, distill=0.0, query_init="pca")  # the paper's recipe
    assert FusionRecipe.from_dict(plain.to_dict()) == plain
    assert "anchor" not in plain.mixer_params()  # models trained before keep their fingerprint
    old = {k: v for k, v in plain.to_dict().items() if k not in ("anchor", "distill",
                                                                   "query_init")}
    assert FusionRecipe.from_dict(old) == plain  # a recipe recorded before these fields
    r = FusionRecipe(anchor=True, distill=2.0, query_init="regress")
    assert r.mixer_params()["anchor"] is True
    assert FusionRecipe.from_dict(r.to_dict()) == r
    with pytest.raises(InputError, match="query_init"):
        FusionRecipe(query_init="zero")
    with pytest.raises(InputError, match="distill"):
        FusionRecipe(distill=-1.0)


def test_anchored_regressed_start_is_scored_and_beats_a_random_query_start():
    data = synthetic(n_classes=64, per=4)
    short = {**RECIPE.to_dict(), "epochs": 2}
    plain = fit_fusion(data, FusionRecipe(**{**short, "anchor": False, "distill": 0.0,
                                             "query_init": "pca"}))
    anch = fit_fusion(data, FusionRecipe(**{**short, "anchor": True, "query_init": "regress",
                                            "distill": 1.0}))
    s0, a0 = plain.history[0], anch.history[0]
    assert s0.epoch == a0.epoch == 0
    # the anchored start is the PCA of the concatenation: far better on held-out classes
    # than a random mixer, and the regressed query lands in its space
    assert a0.val_sym > s0.val_sym + 0.05
    assert a0.val_asym > s0.val_asym + 0.02
    assert anch.init["query_init_cosine"] > 0.3
    kept = anch.best_epoch["joint"]  # the kept weights are the best-scoring record's
    assert anch.history[kept].score == max(h.score for h in anch.history)


def test_an_unfitted_anchor_is_refused():
    m = build_mixer("mlp", SPECS, d=8, anchor=True)
    with pytest.raises(InputError, match="never fitted"):
        mix(m, _features(np.random.default_rng(0), 3))
