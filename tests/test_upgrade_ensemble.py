"""Rule ``ensemble``: the forward map phi (old -> new), its artifact, search and check.

References: the searcher's top-k against a brute-force numpy implementation of
the formula (every item scored; and, with a small candidate depth, the same
formula restricted to the moved items and the candidates the test derives
itself); the check's cross-fitted reciprocal ranks against phis fitted here
without each fold's pseudo pairs; the artifact refuses the other direction and
other models.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import _tiny
from galleria.errors import CompatibilityError, FormatError
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade import ensemble as ens_mod
from galleria.upgrade import search as search_mod
from galleria.upgrade.job import run_upgrade, start_upgrade
from galleria.upgrade.merge import CohortNorm, cohort_stats
from galleria.upgrade.online import (
    OnlineConfig,
    all_pairs,
    check_rules,
    job_pseudo_queries,
    online_folder,
)
from galleria.upgrade.phi import PhiRidge, load_phi, pseudo_folds
from galleria.upgrade.psi import load_cross_map
from galleria.upgrade.ridge import RidgePsi
from galleria.upgrade.search import BackfillSearcher, resolve_rule
from galleria.upgrade.state import UpgradeError, decision_phi_path, require_upgrade
from galleria.validate import l2_normalize

N = 64
CFG = OnlineConfig(first_at=16, growth=2.0, max_pairs=64, pseudo_queries=20, seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _tiny.noise_pngs(tmp_path_factory.mktemp("ens-imgs"), N, 3)


@pytest.fixture()
def gallery(tmp_path, images):
    g = tmp_path / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2, dim=10), online=CFG,
                  order="random", calib_size=40)
    return g


def _state(g: Gallery):
    """Everything a brute-force reference needs: ids, old vectors of every item (moved
    ones: as they were before the move), new vectors, moved mask."""
    st = require_upgrade(g)
    ko, vo = g.load_vectors(st.old_space)
    kn, vn = g.load_vectors(st.new_space)
    pid, po, _ = all_pairs(g)
    kept = dict(zip(pid, po, strict=True))
    ids = list(g.ids_of(ko)) + list(g.ids_of(kn))
    old = np.concatenate([vo, np.stack([kept[i] for i in g.ids_of(kn)])])
    new = np.concatenate([np.zeros((len(ko), vn.shape[1]), np.float32), vn])
    moved = np.arange(len(ids)) >= len(ko)
    return ids, old, new, moved


def _phi(phi, x):
    """phi written out: ``normalize(normalize(x) W^T + b)``."""
    w, b = phi.weights_[0]
    return l2_normalize(l2_normalize(x) @ w.T + b)


def _reference(phi, norm, qo, qn, old, new, moved):
    """The formula of rule ensemble, written out (the reference)."""
    mo, so = cohort_stats(qo, norm.old_cohort, top=norm.top)
    mn, sn = cohort_stats(qn, norm.new_cohort, top=norm.top)
    me, se = cohort_stats(qn, _phi(phi, norm.old_cohort), top=norm.top)
    z_old = (qo @ old.T - mo) / so
    ghat = _phi(phi, old)
    z_new = np.where(moved[None, :], (qn @ new.T - mn) / sn, (qn @ ghat.T - me) / se)
    return 0.5 * (z_old + z_new)


def test_ensemble_search_equals_brute_force_and_its_candidates(gallery, monkeypatch):
    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        assert d["phi"] and d["phi_map"] and d["phi_pairs"] == 24 + 20  # moved + pseudo
        phi = load_phi(decision_phi_path(g, st), old_fingerprint=st.old_space,
                       new_fingerprint=st.new_space)
        assert phi.fingerprint == d["phi_map"]
        ids, old, new, moved = _state(g)
        _, c_old, c_new = all_pairs(g)
        norm = CohortNorm(c_old, c_new, top=10)
        rng = np.random.default_rng(3)
        qo = l2_normalize(rng.standard_normal((5, 12)).astype(np.float32))
        qn = l2_normalize(rng.standard_normal((5, 10)).astype(np.float32))
        ref = _reference(phi, norm, qo, qn, old, new, moved)
        s = BackfillSearcher(g, rule="ensemble", phi=phi, calibration=norm)
        got = s.search_vectors(old_queries=qo, new_queries=qn, k=20)  # depth 200 >= 64 items
        want = np.argsort(-ref, axis=1, kind="stable")[:, :20]
        assert [list(r) for r in got.ids] == [[ids[j] for j in r] for r in want]
        np.testing.assert_allclose(got.scores, np.take_along_axis(ref, want, 1), atol=1e-4)
        assert s.describe()["merge"]["phi"] == phi.fingerprint
        assert s.cost.per_query()["map_calls_per_query"] > 0
        # no cohort (too few pairs at the start): raw scores, as rule both does then
        raw = 0.5 * (qo @ old.T + np.where(moved[None, :], qn @ new.T, qn @ _phi(phi, old).T))
        got = BackfillSearcher(g, rule="ensemble", phi=phi).search_vectors(
            old_queries=qo, new_queries=qn, k=20)
        want = np.argsort(-raw, axis=1, kind="stable")[:, :20]
        assert [list(r) for r in got.ids] == [[ids[j] for j in r] for r in want]

        # small depth: exact on the moved items + the candidates of the two lists
        depth, k = 4, 10
        monkeypatch.setattr(search_mod, "candidate_depth", lambda kk: depth)
        got = s.search_vectors(old_queries=qo, new_queries=qn, k=k)
        un = np.flatnonzero(~moved)
        _, so = cohort_stats(qo, norm.old_cohort, top=norm.top)
        _, se = cohort_stats(qn, _phi(phi, norm.old_cohort), top=norm.top)
        raw = l2_normalize(norm.old_cohort) @ phi.weights_[0][0].T + phi.weights_[0][1]
        c = np.linalg.norm(raw, axis=1).mean()
        q_lin = l2_normalize(qo / so + (qn @ phi.weights_[0][0]) / (c * se))
        for r in range(len(qo)):
            cand = set(un[np.argsort(-(q_lin[r] @ old[un].T), kind="stable")[:depth]])
            cand |= set(un[np.argsort(-(qo[r] @ old[un].T), kind="stable")[:depth]])
            allowed = np.array([moved[j] or j in cand for j in range(len(ids))])
            row = np.where(allowed, ref[r], -np.inf)
            w = np.argsort(-row, kind="stable")[:k]
            assert list(got.ids[r]) == [ids[j] for j in w]
            np.testing.assert_allclose(got.scores[r], row[w], atol=1e-4)
        # the difference to the exact answer is only items outside the candidates
        assert s.search_vectors(old_queries=qo, new_queries=qn, k=k).ids.shape == (5, k)


def test_the_check_scores_ensemble_cross_fitted(gallery):
    run_upgrade(gallery, limit=32, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        assert {"ensemble", "both", "old-only", "rank-merge"} <= set(d["scores"])
        assert "ensemble" in d["probability"]["rules"]  # calibrated like the others
        assert d["probability"]["rules"]["ensemble"]["map"] == d["phi_map"]
        phi = load_phi(decision_phi_path(g, st), old_fingerprint=st.old_space,
                       new_fingerprint=st.new_space)
        pseudo = job_pseudo_queries(g, st, CFG, _tiny.tiny(1), _tiny.tiny(2, dim=10))
        rr = check_rules(g, pseudo, None, depth=100, phi=phi, seed=CFG.seed)["ensemble"]
        # reference: each fold's queries ranked with a phi fitted without that fold's pairs
        ids, old, new, moved = _state(g)
        _, mo_, mn_ = all_pairs(g)
        from galleria.upgrade.search import job_calibration

        norm = job_calibration(g, "znorm-top")
        assert isinstance(norm, CohortNorm)  # 32 pairs + 20 pseudo-queries >= 50
        folds = pseudo_folds(len(pseudo.ids), seed=CFG.seed)
        want = np.zeros(len(pseudo.ids))
        truth = np.array([ids.index(i) for i in pseudo.ids])
        for f in (0, 1):
            rows = np.flatnonzero(folds == f)
            other = folds != f
            m = PhiRidge(max_pairs=CFG.max_pairs, seed=CFG.seed).fit(
                np.concatenate([mo_, pseudo.old[other]]), np.concatenate([mn_, pseudo.new[other]]),
                old_fingerprint=st.old_space, new_fingerprint=st.new_space)
            assert m.fingerprint != phi.fingerprint
            s = _reference(m, norm, pseudo.old[rows], pseudo.new[rows], old, new, moved)
            t = truth[rows]
            rank = (s > s[np.arange(len(rows)), t][:, None]).sum(1)
            want[rows] = 1.0 / (1.0 + rank)
        np.testing.assert_allclose(rr, want, atol=1e-6)
        # the served phi saw every pseudo pair: scoring with it is not what the check does
        leak = _reference(phi, norm, pseudo.old, pseudo.new, old, new, moved)
        rank = (leak > leak[np.arange(len(truth)), truth][:, None]).sum(1)
        assert not np.allclose(rr, 1.0 / (1.0 + rank))
        assert d["moved"] == 32 and d["pairs"] == 32  # that check: this state, these folds
        assert d["scores"]["ensemble"]["mrr"] == pytest.approx(100 * rr.mean(), abs=1e-3)
        # auto follows the decision; a decision for ensemble is served with its phi
        assert resolve_rule("auto", g, st) == d["rule"]


def test_phi_refuses_the_other_direction_and_other_models(gallery, tmp_path):
    run_upgrade(gallery, limit=16, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        folder = decision_phi_path(g, st)
        phi = load_phi(folder, old_fingerprint=st.old_space, new_fingerprint=st.new_space)
        assert phi.input_fingerprint == st.old_space and phi.output_fingerprint == st.new_space
        assert phi.fingerprint.startswith(st.old_space + "|phi-ridge@")
        x = l2_normalize(np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32))
        assert phi.transform(x, fingerprint=st.old_space).shape == (3, 10)
        with pytest.raises(CompatibilityError):  # new-space vectors into phi
            phi.transform(x, fingerprint=st.new_space)
        with pytest.raises(CompatibilityError):
            phi.transform(x[:, :10])
        with pytest.raises(CompatibilityError):  # a phi for other models
            load_phi(folder, old_fingerprint=st.new_space, new_fingerprint=st.old_space)
        with pytest.raises(CompatibilityError, match="forward map phi"):  # phi given as psi
            load_cross_map(folder)
        psi = RidgePsi().fit(x[:, :10].repeat(4, 0), x.repeat(4, 0),
                             new_fingerprint=st.new_space, old_fingerprint=st.old_space)
        psi.save(tmp_path / "psi")
        with pytest.raises(FormatError):  # psi given as phi
            load_phi(tmp_path / "psi")
        with pytest.raises(UpgradeError):
            BackfillSearcher(g, rule="ensemble", phi=psi)  # type: ignore[arg-type]
        with pytest.raises(UpgradeError):
            BackfillSearcher(g, rule="psi", psi=phi)
        # a decision that records another phi than the folder holds: refused as stale
        state = require_upgrade(g)
        d = dict(state.online["decision"], phi_map="x|phi-ridge@0")
        from galleria.upgrade.online import publish

        publish(g, d)
        with pytest.raises(UpgradeError, match="republished"):
            BackfillSearcher.open(g, rule="ensemble", with_models=False)
        # auto, told to serve ensemble but without a phi it can trust: the old answers
        publish(g, dict(d, rule="ensemble", checked=True))
        assert BackfillSearcher.open(g, with_models=False).rule == "old-only"
        publish(g, dict(d, rule="ensemble", checked=True, phi_map=phi.fingerprint))
        assert BackfillSearcher.open(g, with_models=False).rule == "ensemble"


def test_ensemble_search_while_the_job_moves_items(gallery):
    """Searches from threads while the run moves items and republishes phi: every answer
    is k distinct items, each item at most once (one committed state, kept old vectors for
    items that moved between the view and the read); a searcher opened meanwhile loads
    the phi its decision records."""
    run_upgrade(gallery, limit=16, commit_every=8)
    errors: list[BaseException] = []
    done = threading.Event()
    with Gallery.open(gallery) as g:
        s = BackfillSearcher.open(g, rule="ensemble", with_models=False)
        rng = np.random.default_rng(1)
        qo = l2_normalize(rng.standard_normal((4, 12)).astype(np.float32))
        qn = l2_normalize(rng.standard_normal((4, 10)).astype(np.float32))

        def searcher(reopen: bool) -> None:
            try:
                n = 0
                while not done.is_set() or n < 3:
                    if reopen:  # the published phi, read while the job republishes it
                        with Gallery.open(gallery) as g2:
                            s2 = BackfillSearcher.open(g2, rule="ensemble", with_models=False)
                            res = s2.search_vectors(old_queries=qo, new_queries=qn, k=N)
                            seen.add(s2.phi.fingerprint)
                    else:
                        res = s.search_vectors(old_queries=qo, new_queries=qn, k=N)
                    for row in res.ids:
                        assert None not in row and len(set(row)) == N
                    n += 1
            except BaseException as exc:
                errors.append(exc)

        seen: set[str] = set()
        run_alongside(gallery, [threading.Thread(target=searcher, args=(r,))
                                for r in (False, True)], done)
    assert not errors, errors[0]
    assert len(seen) >= 1
    assert len(list(online_folder(gallery).glob("phi-*"))) <= 2  # current and previous


def run_alongside(gallery, threads, done: threading.Event) -> None:
    """Start ``threads``, run the job (40 items, a commit every 4), then stop and join
    them (bounded)."""
    for t in threads:
        t.start()
    try:
        run_upgrade(gallery, limit=40, commit_every=4)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)


def test_read_old_vectors_falls_back_to_the_kept_vectors(gallery):
    """An item that moved after the view was taken is read from the job's kept pairs."""
    run_upgrade(gallery, limit=8, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        view = g.views([st.old_space])[st.old_space]
        keys = view.keys()[:6]
        ids = view.ids.lookup(keys)
        before = g.get_vectors(keys, space=st.old_space)
    run_upgrade(gallery, limit=N, commit_every=8)  # everything moves
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        from galleria.upgrade.oldonly import MovedOldVectors

        got = ens_mod.read_old_vectors(g, st.old_space, MovedOldVectors(g.path), keys, ids)
        np.testing.assert_array_equal(got, before)


def test_a_failing_phi_fit_leaves_ensemble_out(gallery, monkeypatch):
    """phi is an add-on of the online fit: its failure publishes psi and the check
    without rule ensemble (and auto never serves it)."""
    import galleria.upgrade.phi_online as phi_online

    def boom(*a, **k):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(phi_online, "fit_phi", boom)
    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        assert d["checked"] and d["psi"] and d["fits"] >= 1
        assert d["phi"] is None and "ensemble" not in d["scores"]
        assert resolve_rule("auto", g, st) != "ensemble"
