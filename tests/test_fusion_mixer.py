"""Mixer shapes and symmetries, local-set packing, ArcFace against its closed form, momentum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from galleria.errors import CompatibilityError, InputError
from galleria.fusion.arcface import arcface_logits, arcface_loss, momentum_update_
from galleria.fusion.members import pack_local, unpack_local
from galleria.fusion.mixer import (
    InputSpec,
    MLPMixer,
    TransformerMixer,
    as_mixer_inputs,
    check_inputs,
    mix,
)
from galleria.types import LocalFeatures

SPECS = [InputSpec("a", "a@1", "global", 12), InputSpec("b", "b@1", "global", 7),
         InputSpec("loc", "l@1", "local", 5, top_n=6)]


def _inputs(rng, b=3, n_local=4):
    loc = np.zeros((b, 6, 5), np.float32)
    loc[:, :n_local] = rng.standard_normal((b, n_local, 5))
    return [torch.from_numpy(rng.standard_normal((b, 12)).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((b, 7)).astype(np.float32)),
            torch.from_numpy(loc)]


def _mixer(seed=0, specs=SPECS, **kw):
    torch.manual_seed(seed)
    return TransformerMixer(specs, d=16, layers=2, heads=4, **kw).eval()


def test_transformer_mixer_shapes_and_batch_independence(rng):
    m = _mixer()
    x = _inputs(rng, b=5)
    out = m(x)
    assert out.shape == (5, 16)
    one = m([t[2:3] for t in x])  # an image's vector does not depend on the batch
    torch.testing.assert_close(one, out[2:3], atol=1e-5, rtol=1e-5)


def test_local_rows_are_a_set_and_padding_is_ignored(rng):
    m = _mixer()
    x = _inputs(rng, b=2, n_local=4)
    base = m(x)
    perm = x[2].clone()
    perm[:, :4] = perm[:, [2, 0, 3, 1]]  # reorder the descriptors
    torch.testing.assert_close(m([x[0], x[1], perm]), base, atol=1e-5, rtol=1e-5)
    moved = torch.zeros_like(x[2])
    moved[:, 2:6] = x[2][:, :4]  # padding rows elsewhere: same set
    torch.testing.assert_close(m([x[0], x[1], moved]), base, atol=1e-5, rtol=1e-5)
    changed = x[2].clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(m([x[0], x[1], changed]), base, atol=1e-4)


def test_reordering_inputs_with_their_projections_changes_nothing(rng):
    m = _mixer()
    specs2 = [SPECS[1], SPECS[0], SPECS[2]]
    m2 = _mixer(seed=1, specs=specs2)
    m2.load_state_dict(m.state_dict() | {
        "proj.0.weight": m.proj[1].weight, "proj.0.bias": m.proj[1].bias,
        "proj.1.weight": m.proj[0].weight, "proj.1.bias": m.proj[0].bias})
    x = _inputs(rng)
    torch.testing.assert_close(m2([x[1], x[0], x[2]]), m(x), atol=1e-5, rtol=1e-5)


def test_wrong_shapes_are_refused(rng):
    m = _mixer()
    x = _inputs(rng)
    with pytest.raises(InputError, match="expected"):
        m([x[1], x[0], x[2]])
    with pytest.raises(InputError, match="3 inputs"):
        m(x[:2])


def test_mlp_mixer_and_numpy_path(rng):
    torch.manual_seed(0)
    m = MLPMixer(SPECS, d=16).eval()
    stored = [rng.standard_normal((9, s.stored_dim)).astype(np.float32) for s in SPECS]
    out = mix(m, stored, batch=4)
    assert out.shape == (9, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    t = _mixer()
    np.testing.assert_allclose(mix(t, stored, batch=4), mix(t, stored, batch=100), atol=1e-5)


def test_check_inputs_names_both():
    other = [SPECS[0], InputSpec("b", "b@2", "global", 7), SPECS[2]]
    with pytest.raises(CompatibilityError, match=r"b@1.*b@2"):
        check_inputs(SPECS, other)
    with pytest.raises(CompatibilityError, match="13-d"):
        check_inputs(SPECS[:1], [InputSpec("a", "a@1", "global", 13)])
    check_inputs(SPECS, list(SPECS))


def test_pack_local_keeps_the_top_scored_and_round_trips(rng):
    kp = np.zeros((9, 4), np.float32)
    kp[:, 3] = rng.permutation(9)
    desc = rng.standard_normal((9, 5)).astype(np.float32)
    packed = pack_local(LocalFeatures(kp, desc, (10, 10)), top_n=6)
    assert packed.shape == (30,)
    assert np.isclose(np.linalg.norm(packed), 1.0)
    rows, valid = unpack_local(packed[None], 6)
    assert valid.all()
    top = np.argsort(-kp[:, 3])[:6]
    np.testing.assert_allclose(rows[0], desc[top] / np.linalg.norm(desc[top], axis=1,
                                                                  keepdims=True), atol=1e-6)
    few = pack_local(LocalFeatures(kp[:2], desc[:2]), top_n=6)
    _, valid = unpack_local(few[None], 6)
    assert valid.sum() == 2
    empty = pack_local(LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, 5), np.float32)),
                       top_n=6)
    assert not empty.any()
    # the mixer sees unit rows again and masks the padding
    t = as_mixer_inputs([SPECS[2]], [np.stack([packed, few])])[0]
    assert t.shape == (2, 6, 5)
    np.testing.assert_allclose(t[0].norm(dim=1).numpy(), 1.0, rtol=1e-5)


def _reference(cos, label, margin, scale):
    theta = math.acos(cos[label])
    t = math.cos(theta + margin) if theta + margin < math.pi else \
        cos[label] - math.sin(math.pi - margin) * margin
    logits = [scale * (t if j == label else c) for j, c in enumerate(cos)]
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(v - m) for v in logits)))


def test_arcface_matches_the_closed_form(rng):
    x = torch.from_numpy(rng.standard_normal((6, 8)))
    w = torch.from_numpy(rng.standard_normal((5, 8)))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    xn = x / x.norm(dim=1, keepdim=True)
    wn = w / w.norm(dim=1, keepdim=True)
    cos = (xn @ wn.T).numpy()
    ref = np.mean([_reference(cos[i], int(y[i]), 0.3, 32.0) for i in range(6)])
    got = float(arcface_loss(x, w, y, margin=0.3, scale=32.0))
    assert got == pytest.approx(ref, rel=1e-9)
    # the branch past pi - m: cos(theta_y) = -0.99
    c = torch.tensor([[-0.99, 0.2]], dtype=torch.float64)
    lg = arcface_logits(c, torch.tensor([0]), margin=0.3, scale=2.0)
    assert float(lg[0, 0]) == pytest.approx(2.0 * (-0.99 - math.sin(math.pi - 0.3) * 0.3))
    assert float(lg[0, 1]) == pytest.approx(0.4)
    # margin 0 is plain normalised softmax
    plain = torch.nn.functional.cross_entropy(32.0 * (xn @ wn.T), y)
    assert float(arcface_loss(x, w, y, margin=0.0, scale=32.0)) == pytest.approx(float(plain))


def test_momentum_update():
    wq = torch.ones(3, 2)
    wm = torch.zeros(3, 2, requires_grad=True)
    momentum_update_(wq, wm, 0.99)
    torch.testing.assert_close(wq, torch.full((3, 2), 0.99))
    for _ in range(9):
        momentum_update_(wq, wm, 0.99)
    torch.testing.assert_close(wq, torch.full((3, 2), 0.99 ** 10))
    momentum_update_(wq, wm + 2.0, 0.0)  # a = 0 copies W_mix
    torch.testing.assert_close(wq, torch.full((3, 2), 2.0))
    with pytest.raises(InputError):
        momentum_update_(wq, wm, 1.0)
