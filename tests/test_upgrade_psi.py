"""psi (regression, metric-compatible) and the BCT head on seeded synthetic pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.upgrade.bct import BCTHead
from galleria.upgrade.psi import ReverseTransform, load_cross_map, metric_compatible_loss
from galleria.validate import l2_normalize

OLD_FP = "old-model@00000000000000aa"
NEW_FP = "new-model@00000000000000bb"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is faster, and the thread count is the entry point's choice."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pairs(n=600, d_lat=8, d_old=12, d_new=16, classes=6, seed=0):
    """Latent class clusters seen by two different 'models' (random linear maps + noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d_lat)) * 2.0
    y = rng.integers(0, classes, n)
    z = centers[y] + rng.standard_normal((n, d_lat))
    a = rng.standard_normal((d_lat, d_old))
    b = rng.standard_normal((d_lat, d_new))
    old = l2_normalize((z @ a + 0.1 * rng.standard_normal((n, d_old))).astype(np.float32))
    new = l2_normalize((z @ b + 0.1 * rng.standard_normal((n, d_new))).astype(np.float32))
    return new, old, y


def test_regression_psi_imitates_the_old_model_and_round_trips(tmp_path):
    new, old, _ = pairs()
    psi = ReverseTransform(hidden=32, epochs=40, batch_size=64, lr=3e-3, seed=1).fit(
        new[:500], old[:500], new_fingerprint=NEW_FP, old_fingerprint=OLD_FP)
    held = psi.transform(new[500:])
    cos = np.sum(held * old[500:], axis=1)
    assert cos.mean() > 0.9 and held.shape == (100, 12)
    # same seed, same map
    again = ReverseTransform(hidden=32, epochs=40, batch_size=64, lr=3e-3, seed=1).fit(
        new[:500], old[:500], new_fingerprint=NEW_FP, old_fingerprint=OLD_FP)
    assert again.fingerprint == psi.fingerprint
    assert psi.calibration("quantile") is not None and psi.calibration("platt") is None
    psi.save(tmp_path / "psi")
    back = load_cross_map(tmp_path / "psi", old_fingerprint=OLD_FP, new_fingerprint=NEW_FP)
    np.testing.assert_array_equal(back.transform(new[:5]), psi.transform(new[:5]))
    assert back.fingerprint == psi.fingerprint


def test_psi_for_other_models_is_a_clear_error(tmp_path):
    new, old, _ = pairs(n=80)
    psi = ReverseTransform(hidden=0, epochs=2, batch_size=16).fit(
        new, old, new_fingerprint=NEW_FP, old_fingerprint=OLD_FP)
    psi.save(tmp_path / "psi")
    with pytest.raises(CompatibilityError) as ei:
        load_cross_map(tmp_path / "psi", old_fingerprint="other@1", new_fingerprint=NEW_FP)
    assert OLD_FP in str(ei.value) and "other@1" in str(ei.value)
    with pytest.raises(CompatibilityError, match="new"):
        psi.transform(new, fingerprint="other@2")
    with pytest.raises(CompatibilityError, match="16-d"):
        psi.transform(old)
    with pytest.raises(InputError, match="same"):
        ReverseTransform().fit(new, old, new_fingerprint=OLD_FP, old_fingerprint=OLD_FP)
    with pytest.raises(InputError, match="labels"):
        ReverseTransform(loss="metric-compatible").fit(new, old)
    # an edited header (weights no longer match) is refused
    h = json.loads((tmp_path / "psi" / "header.json").read_text())
    h["params"]["seed"] = 99
    (tmp_path / "psi" / "header.json").write_text(json.dumps(h))
    with pytest.raises(FormatError, match="do not match"):
        load_cross_map(tmp_path / "psi")


def test_metric_compatible_loss_reference():
    """The loss equals a direct per-anchor computation of the two-block softmax."""
    import torch

    rng = np.random.default_rng(0)
    p = torch.nn.functional.normalize(torch.tensor(rng.standard_normal((6, 4))), dim=1)
    o = torch.nn.functional.normalize(torch.tensor(rng.standard_normal((6, 4))), dim=1)
    n = torch.nn.functional.normalize(torch.tensor(rng.standard_normal((6, 5))), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 3])
    got = float(metric_compatible_loss(p, o, n, y, temperature=0.1))
    terms = []
    for i in range(6):
        cand = [(float(p[i] @ o[j]), int(y[j])) for j in range(6) if j != i]
        cand += [(float(n[i] @ n[j]), int(y[j])) for j in range(6) if j != i]
        logits = np.array([c[0] for c in cand]) / 0.1
        logp = logits - np.log(np.exp(logits).sum())
        pos = [lp for lp, c in zip(logp, cand, strict=True) if c[1] == int(y[i])]
        if pos:
            terms.append(-np.mean(pos))
    assert got == pytest.approx(np.mean(terms), rel=1e-6)


def test_metric_compatible_psi_makes_cross_space_scores_comparable():
    """A same-class old item must outscore a different-class new item, across spaces."""
    new, old, y = pairs(n=800, seed=3)
    tr, te = slice(0, 600), slice(600, 800)
    kw = {"hidden": 32, "epochs": 30, "batch_size": 128, "lr": 3e-3, "seed": 0}
    reg = ReverseTransform(**kw).fit(new[tr], old[tr])
    mc = ReverseTransform(loss="metric-compatible", **kw).fit(new[tr], old[tr], labels=y[tr])

    def cross_auc(m):
        q = m.transform(new[te])
        s_old = q @ old[te].T  # query vs old part
        s_new = new[te] @ new[te].T  # query vs new part
        same = y[te][:, None] == y[te][None, :]
        np.fill_diagonal(same, False)
        diff = y[te][:, None] != y[te][None, :]
        pos, neg = s_old[same], s_new[diff]  # old-part positives vs new-part negatives
        return float((pos[:, None] > neg[None, ::7]).mean())

    assert cross_auc(mc) > cross_auc(reg)
    assert cross_auc(mc) > 0.9


def test_bct_head_is_classified_by_the_old_classifier(tmp_path):
    new, old, y = pairs(n=500, seed=4)
    head = BCTHead(hidden=32, epochs=30, batch_size=100, lr=3e-3).fit(
        new, old, labels=y, new_fingerprint=NEW_FP, old_fingerprint=OLD_FP)
    assert head.info_["train_acc_old_classifier_on_head"] > 0.9
    h = head.transform(new)
    # h(new(q)) retrieves same-class old items
    s = h @ old.T
    np.fill_diagonal(s, -np.inf)
    assert (y[s.argmax(1)] == y).mean() > 0.85
    head.save(tmp_path / "bct")
    back = load_cross_map(tmp_path / "bct")
    assert isinstance(back, BCTHead)
    np.testing.assert_allclose(back.transform(new[:3]), h[:3], atol=1e-6)
    with pytest.raises(InputError, match="labels"):
        BCTHead().fit(new, old)
