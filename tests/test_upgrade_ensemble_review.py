"""Review of rule ``ensemble``: edge cases of its searcher and of its check.

References: the formula of rule ensemble written out in numpy over every item
(``test_upgrade_ensemble._reference``); the cross-fit's promise that a fold's map
never saw that fold's pseudo pairs (checked by refitting here).
"""

from __future__ import annotations

import numpy as np
import pytest

from galleria.store.gallery import Gallery
from galleria.upgrade.job import run_upgrade
from galleria.upgrade.merge import CohortNorm
from galleria.upgrade.online import all_pairs
from galleria.upgrade.phi import load_phi
from galleria.upgrade.search import BackfillSearcher
from galleria.upgrade.state import UpgradeError, decision_phi_path, require_upgrade
from galleria.validate import l2_normalize
from test_upgrade_ensemble import (  # noqa: F401
    CFG,
    N,
    _reference,
    _state,
    gallery,
    images,
    run_alongside,
)


def _queries(seed: int, nq: int = 4):
    rng = np.random.default_rng(seed)
    return (l2_normalize(rng.standard_normal((nq, 12)).astype(np.float32)),
            l2_normalize(rng.standard_normal((nq, 10)).astype(np.float32)))


def _served(g):
    st = require_upgrade(g)
    phi = load_phi(decision_phi_path(g, st), old_fingerprint=st.old_space,
                   new_fingerprint=st.new_space)
    _, c_old, c_new = all_pairs(g)
    return phi, CohortNorm(c_old, c_new, top=10)


def _check_exact(g, phi, norm, k):
    ids, old, new, moved = _state(g)
    qo, qn = _queries(5)
    ref = _reference(phi, norm, qo, qn, old, new, moved)
    got = BackfillSearcher(g, rule="ensemble", phi=phi, calibration=norm).search_vectors(
        old_queries=qo, new_queries=qn, k=k)
    kk = min(k, len(ids))
    want = np.argsort(-ref, axis=1, kind="stable")[:, :kk]
    assert got.ids.shape == (len(qo), kk)
    assert [list(r) for r in got.ids] == [[ids[j] for j in r] for r in want]
    np.testing.assert_allclose(got.scores, np.take_along_axis(ref, want, 1), atol=1e-4)


@pytest.mark.parametrize("k", [1, N, 3 * N])
def test_ensemble_k_up_to_and_beyond_the_gallery_is_exact(gallery, k):  # noqa: F811
    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        phi, norm = _served(g)
        _check_exact(g, phi, norm, k)


def test_ensemble_with_every_item_moved_is_rule_both(gallery):  # noqa: F811
    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        phi, _ = _served(g)
    run_upgrade(gallery, limit=N, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        assert g.count(st.new_space) == N
        _, c_old, c_new = all_pairs(g)
        _check_exact(g, phi, CohortNorm(c_old, c_new, top=10), N)


@pytest.mark.parametrize("rows", [0, 5, 40])
def test_ensemble_chunks_and_a_full_candidate_cache_stay_exact(gallery, monkeypatch, rows):  # noqa: F811
    """Many query chunks sharing candidates, with the per-call cache empty, partly full
    and holding everything: the answers are the formula's."""
    from galleria.upgrade import ensemble as ens_mod

    monkeypatch.setattr(ens_mod, "QUERY_CHUNK", 3)
    monkeypatch.setattr(ens_mod, "CACHE_ROWS", rows)
    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        phi, norm = _served(g)
        ids, old, new, moved = _state(g)
        qo, qn = _queries(7, nq=11)
        ref = _reference(phi, norm, qo, qn, old, new, moved)
        got = BackfillSearcher(g, rule="ensemble", phi=phi, calibration=norm).search_vectors(
            old_queries=qo, new_queries=qn, k=N)
        want = np.argsort(-ref, axis=1, kind="stable")
        assert [list(r) for r in got.ids] == [[ids[j] for j in r] for r in want]
        np.testing.assert_allclose(got.scores, np.take_along_axis(ref, want, 1), atol=1e-4)


def test_ensemble_items_moved_or_removed_between_the_view_and_the_read(gallery, monkeypatch):  # noqa: F811
    """The search's view is taken, then the job moves items and some old-part items
    are removed: moved ones are scored from their kept old vectors (as in the view),
    removed ones are left out, nothing else changes."""
    run_upgrade(gallery, limit=16, commit_every=8)
    with Gallery.open(gallery) as g:
        phi, norm = _served(g)
        st = require_upgrade(g)
        ids, old, new, moved = _state(g)
        views = g.views([st.old_space, st.new_space])
    run_upgrade(gallery, limit=16, commit_every=8)  # 16 more items move
    with Gallery.open(gallery) as g:
        unmoved = [i for i, m in zip(ids, moved, strict=True) if not m]
        now_old = set(g.ids(st.old_space))
        gone = [i for i in unmoved if i in now_old][:3]
        assert len(gone) == 3 and len(set(unmoved) - now_old) == 16
        g.remove(gone)
        monkeypatch.setattr(g, "views", lambda spaces: views)
        qo, qn = _queries(9)
        ref = _reference(phi, norm, qo, qn, old, new, moved)
        ref[:, [ids.index(i) for i in gone]] = -np.inf
        got = BackfillSearcher(g, rule="ensemble", phi=phi, calibration=norm).search_vectors(
            old_queries=qo, new_queries=qn, k=N)
        want = np.argsort(-ref, axis=1, kind="stable")[:, : N - 3]
        assert [list(r[: N - 3]) for r in got.ids] == [[ids[j] for j in r] for r in want]
        assert all(r[N - 3:].tolist() == [None] * 3 for r in got.ids)


def test_a_damaged_published_phi_does_not_stop_the_rechecks(gallery):  # noqa: F811
    """phi is an add-on of the check: when the folder the decision names cannot be read,
    a recheck still checks and publishes every rule (phi fitted again), and search
    with rule ensemble works again afterwards."""
    import _tiny
    from galleria.upgrade.online import recheck

    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        for f in decision_phi_path(g, st).glob("state-*"):
            f.write_bytes(f.read_bytes()[:40])  # damaged on disk
        checks = st.online["decision"]["checks"]
        d = recheck(g, CFG, old_model=_tiny.tiny(1), new_model=_tiny.tiny(2, dim=10))
        assert d["checked"] and d["checks"] == checks + 1
        assert {"old-only", "both", "rank-merge", "ensemble"} <= set(d["scores"])
        st = require_upgrade(g)
        phi = load_phi(decision_phi_path(g, st), old_fingerprint=st.old_space,
                       new_fingerprint=st.new_space)
        assert phi.fingerprint == d["phi_map"]
        s = BackfillSearcher.open(g, rule="ensemble", with_models=False)
        qo, qn = _queries(2)
        assert s.search_vectors(old_queries=qo, new_queries=qn, k=5).ids.shape == (4, 5)


def test_fold_maps_kept_in_memory_never_serve_other_folds():
    """The fold maps kept for a served phi are reused only for the same folds of the same
    pseudo pairs: asked for other folds (another seed) or other pseudo pairs, each fold's
    map is the one fitted without that fold's pairs."""
    from galleria.upgrade.phi import fit_phi, pseudo_folds
    from galleria.upgrade.phi_online import fold_maps

    rng = np.random.default_rng(0)
    mo = l2_normalize(rng.standard_normal((30, 12)).astype(np.float32))
    mn = l2_normalize(rng.standard_normal((30, 10)).astype(np.float32))
    po = l2_normalize(rng.standard_normal((24, 12)).astype(np.float32))
    pn = l2_normalize(rng.standard_normal((24, 10)).astype(np.float32))
    fp = {"old_fingerprint": "old-m", "new_fingerprint": "new-m"}
    phi = fit_phi(mo, mn, po, pn, **fp)

    def expect(seed, a, b):
        folds, maps = fold_maps(phi, len(a), lambda: (mo, mn), a, b, seed=seed)
        np.testing.assert_array_equal(folds, pseudo_folds(len(a), seed=seed))
        for f, m in enumerate(maps):
            want = fit_phi(mo, mn, a[folds != f], b[folds != f], **fp)
            assert m.fingerprint == want.fingerprint, (seed, f)

    from galleria.upgrade import phi_online

    expect(0, po, pn)
    fits = []
    real = phi_online.fit_phi
    phi_online.fit_phi = lambda *a, **k: (fits.append(1), real(*a, **k))[1]
    try:
        fold_maps(phi, len(po), lambda: (mo, mn), po.copy(), pn.copy(), seed=0)
    finally:
        phi_online.fit_phi = real
    assert not fits  # the same folds of the same pairs: from memory
    expect(1, po, pn)  # other folds of the same pairs
    expect(0, po[::-1].copy(), pn[::-1].copy())  # other pseudo pairs (same count)
    expect(0, po[:20], pn[:20])  # fewer pseudo-queries


def test_auto_never_serves_a_phi_republished_unchecked_while_it_loads(gallery, monkeypatch):  # noqa: F811
    """auto resolves to ensemble on the decision it read; the job publishes twice while
    the searcher loads that decision's phi (its folder is removed), and the phi named
    now was never checked: auto serves the old answers, not ensemble with that phi."""
    from galleria.upgrade import search as search_mod
    from galleria.upgrade.online import online_folder, publish
    from galleria.upgrade.phi import fit_phi

    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = dict(st.online["decision"], rule="ensemble", checked=True)
        publish(g, d)
        _, po, pn = all_pairs(g)
        real = search_mod.published_phi

        def racing(gallery_, state, path=None):
            for n in (10, 12):  # two publications: the folder read first is dropped
                m = fit_phi(po[:n], pn[:n], None, None, old_fingerprint=st.old_space,
                            new_fingerprint=st.new_space)  # right models, never checked
                m.save(online_folder(g) / f"phi-unchecked{n}")
                publish(g, dict(d, checked=False, rule="rank-merge",
                                phi=f"upgrade/online/phi-unchecked{n}", phi_map=m.fingerprint))
            assert decision_phi_path(g, state) is None
            return real(gallery_, state, path)

        monkeypatch.setattr(search_mod, "published_phi", racing)
        s = BackfillSearcher.open(g, with_models=False)
        assert s.rule != "ensemble" or s.phi.fingerprint == d["phi_map"], s.phi.fingerprint


def test_brute_force_is_the_formula(gallery):  # noqa: F811
    """``ensemble.brute_force`` (the benchmark's reference for the candidate search) is the
    formula written out, with and without a cohort."""
    from galleria.upgrade.ensemble import EnsembleScorer, brute_force

    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        phi, norm = _served(g)
        _, old, new, moved = _state(g)
        qo, qn = _queries(11)
        np.testing.assert_allclose(brute_force(EnsembleScorer(phi, norm), qo, qn, old, new, moved),
                                   _reference(phi, norm, qo, qn, old, new, moved), atol=1e-5)
        ghat = l2_normalize(l2_normalize(old) @ phi.weights_[0][0].T + phi.weights_[0][1])
        raw = 0.5 * (qo @ old.T + np.where(moved[None, :], qn @ new.T, qn @ ghat.T))
        np.testing.assert_allclose(brute_force(EnsembleScorer(phi, None), qo, qn, old, new, moved),
                                   raw, atol=1e-5)


def test_the_check_cross_fits_a_phi_that_saw_pseudo_pairs_even_if_they_are_unreadable_now(
        gallery, monkeypatch):  # noqa: F811
    """The served phi learned from the pseudo pairs (its record says so); when they cannot
    be read at the moment of the check, the check still cross-fits (never scores the
    pseudo-queries with the phi that saw them)."""
    import _tiny
    from galleria.upgrade import phi_online
    from galleria.upgrade.online import check_rules, job_pseudo_queries

    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        phi, _ = _served(g)
        assert phi.info_["pseudo_pairs"] == CFG.pseudo_queries
        pseudo = job_pseudo_queries(g, st, CFG, _tiny.tiny(1), _tiny.tiny(2, dim=10))
        want = check_rules(g, pseudo, None, phi=phi, seed=CFG.seed)["ensemble"]
        monkeypatch.setattr(phi_online, "load_pseudo_pairs", lambda path: None)  # a read error
        got = check_rules(g, pseudo, None, phi=phi, seed=CFG.seed).get("ensemble")
        assert got is not None
        np.testing.assert_allclose(got, want)


def test_ensemble_refuses_queries_of_the_wrong_dimension_clearly(gallery):  # noqa: F811
    """As every other rule: an InputError naming the space, not a numpy error."""
    from galleria.errors import InputError

    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        phi, norm = _served(g)
        qo, qn = _queries(1)
        for cal in (None, norm):
            s = BackfillSearcher(g, rule="ensemble", phi=phi, calibration=cal)
            with pytest.raises(InputError, match="dimension"):
                s.search_vectors(old_queries=qn, new_queries=qo, k=3)  # swapped
            with pytest.raises(InputError, match="dimension"):
                s.search_vectors(old_queries=qo, new_queries=qo, k=3)
            assert s.search_vectors(old_queries=qo, new_queries=qn, k=3).ids.shape == (4, 3)


KILL_AFTER_PHI_SAVE = r"""
import os, signal, sys
sys.path[:0] = [sys.argv[2]]
import _tiny
import galleria.upgrade.online as online
from galleria.upgrade.job import run_upgrade

run_upgrade(sys.argv[1], commit_every=8, limit=8)
fit = online.fit_job_phi

def killed(*a, **k):
    out = fit(*a, **k)  # phi saved, its decision not published yet
    os.kill(os.getpid(), signal.SIGKILL)

online.fit_job_phi = killed
run_upgrade(sys.argv[1], commit_every=8, limit=24)  # the next fit, at 16 pairs
"""


def test_kill9_between_the_phi_save_and_its_decision(gallery):  # noqa: F811
    """SIGKILL after phi is saved, before the decision naming it is published: the decision
    in force still names a readable phi, search opens, and the resumed run publishes a
    phi and removes the orphan (at most the current and the previous folder remain)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from galleria.upgrade.online import online_folder
    from galleria.upgrade.phi import published_phi

    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent / "src"), str(here)]))
    out = subprocess.run([sys.executable, "-c", KILL_AFTER_PHI_SAVE, str(gallery), str(here)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        named = {Path(g.path, d["phi"]).resolve()} if d.get("phi") else set()
        folders = {p.resolve() for p in online_folder(g).glob("phi-*")}
        orphans = folders - named
        assert orphans  # the phi saved before the kill, not published
        if d.get("phi"):
            assert published_phi(g, st).fingerprint == d["phi_map"]
        BackfillSearcher.open(g, with_models=False)
    run_upgrade(gallery, commit_every=8, limit=16)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        assert d["phi"] and published_phi(g, st).fingerprint == d["phi_map"]
        left = {p.resolve() for p in online_folder(g).glob("phi-*")}
        cur = Path(g.path, d["phi"]).resolve()
        assert len(left) <= 2 and cur in left
        assert all(p == cur or p not in orphans for p in left)  # the orphan is gone
        s = BackfillSearcher.open(g, rule="ensemble", with_models=False)
        qo, qn = _queries(3)
        assert s.search_vectors(old_queries=qo, new_queries=qn, k=5).ids.shape == (4, 5)


def test_ensemble_candidate_reads_per_chunk_are_bounded_whatever_k(gallery, monkeypatch):  # noqa: F811
    """The old vectors (and their phi) held at once are bounded by CACHE_ROWS, not by
    QUERY_CHUNK x 2 x max(200, 4 k) (a large k would hold gigabytes at 1280-d)."""
    from galleria.upgrade import ensemble as ens_mod
    from galleria.upgrade import search as search_mod

    run_upgrade(gallery, limit=16, commit_every=8)
    with Gallery.open(gallery) as g:
        phi, norm = _served(g)
        depth = 4
        monkeypatch.setattr(search_mod, "candidate_depth", lambda kk: depth)
        monkeypatch.setattr(ens_mod, "CACHE_ROWS", 2 * depth * 2)  # two queries' candidates
        s = BackfillSearcher(g, rule="ensemble", phi=phi, calibration=norm)
        reads: list[int] = []
        real = ens_mod.read_old_vectors
        monkeypatch.setattr(search_mod, "read_old_vectors",
                            lambda *a: (reads.append(len(a[3])), real(*a))[1])
        qo, qn = _queries(13, nq=12)
        got = s.search_vectors(old_queries=qo, new_queries=qn, k=3)
        assert reads and max(reads) <= ens_mod.CACHE_ROWS
        # the same answers as with every query in one chunk
        monkeypatch.setattr(ens_mod, "CACHE_ROWS", 65536)
        want = s.search_vectors(old_queries=qo, new_queries=qn, k=3)
        assert [list(r) for r in got.ids] == [list(r) for r in want.ids]
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


def test_auto_searchers_opened_while_the_job_republishes_serve_only_checked_phis(
        gallery, monkeypatch):  # noqa: F811
    """Threads open ``auto`` searchers and search while the run fits, checks and publishes
    (every check made to choose ensemble when it scored it, every other check failing:
    decisions alternate between checked and unchecked phis): every searcher serving
    ensemble uses a phi some *checked* decision chose it with; answers are k distinct
    items."""
    import threading

    from galleria.upgrade import online

    real_decide, real_publish = online.decide_with_old, online.publish
    published: list[dict] = []
    n_checks = [0]

    def decide(rr, mode="until-better", baseline="rank-merge"):
        n_checks[0] += 1
        if n_checks[0] % 2 == 0:
            raise UpgradeError("check made to fail")  # publishes an unchecked decision
        rule, scores, verdict = real_decide(rr, mode=mode, baseline=baseline)
        return ("ensemble" if "ensemble" in rr else rule), scores, verdict

    def publish(g, decision):
        published.append(dict(decision))
        return real_publish(g, decision)

    monkeypatch.setattr(online, "decide_with_old", decide)
    monkeypatch.setattr(online, "publish", publish)
    run_upgrade(gallery, limit=16, commit_every=8)
    errors: list[BaseException] = []
    served: list[tuple[str, str | None]] = []
    done = threading.Event()
    qo, qn = _queries(17)

    def searcher() -> None:
        try:
            n = 0
            while not done.is_set() or n < 3:
                with Gallery.open(gallery) as g2:
                    s = BackfillSearcher.open(g2, with_models=False)
                    res = s.search_vectors(old_queries=qo, new_queries=qn, k=8)
                    served.append((s.rule, s.phi.fingerprint if s.phi is not None else None))
                for row in res.ids:
                    assert None not in row and len(set(row)) == 8
                n += 1
        except BaseException as exc:
            errors.append(exc)

    run_alongside(gallery, [threading.Thread(target=searcher) for _ in range(2)], done)
    assert not errors, errors[0]
    checked = {d["phi_map"] for d in published if d["checked"] and d["rule"] == "ensemble"}
    assert checked and any(not d["checked"] for d in published)
    ens = [fp for rule, fp in served if rule == "ensemble"]
    assert ens and all(fp in checked for fp in ens), set(ens) - checked


def test_train_transform_keeps_the_jobs_phi_and_checks_ensemble(gallery):  # noqa: F811
    """`upgrade train-transform` re-checks and publishes a decision; the job's phi stays
    published (rule ensemble still opens) and ensemble is among the checked rules."""
    from galleria.upgrade.train import train_transform

    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        before = require_upgrade(g).online["decision"]
        assert before["phi"] and "ensemble" in before["scores"]
    train_transform(gallery, from_job=True, kind="regression")
    with Gallery.open(gallery) as g:
        d = require_upgrade(g).online["decision"]
        assert d["source"] == "train-transform" and d["checked"]
        assert d["phi"] == before["phi"] and d["phi_map"] == before["phi_map"]
        assert "ensemble" in d["scores"]
        s = BackfillSearcher.open(g, rule="ensemble", with_models=False)
        assert s.phi.fingerprint == before["phi_map"]


def test_a_recheck_records_the_phi_folder_it_checked(gallery, monkeypatch):  # noqa: F811
    """A publication by another command (`upgrade train-transform`) while a recheck loads
    the published phi: the decision the recheck publishes names a folder holding the
    very phi it records (``phi_map``), so search can open it."""
    import _tiny
    from galleria.upgrade import phi_online
    from galleria.upgrade.online import online_folder, publish, recheck
    from galleria.upgrade.phi import fit_phi

    run_upgrade(gallery, limit=24, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = dict(st.online["decision"])
        _, po, pn = all_pairs(g)
        real = phi_online.published_phi

        def racing(gallery_, state, path=None):
            for n in (10, 12):  # two publications meanwhile: the folder read first is gone
                m = fit_phi(po[:n], pn[:n], None, None, old_fingerprint=st.old_space,
                            new_fingerprint=st.new_space)
                m.save(online_folder(g) / f"phi-other{n}")
                publish(g, dict(d, phi=f"upgrade/online/phi-other{n}", phi_map=m.fingerprint))
            return real(gallery_, state, path)

        monkeypatch.setattr(phi_online, "published_phi", racing)
        out = recheck(g, CFG, old_model=_tiny.tiny(1), new_model=_tiny.tiny(2, dim=10))
        monkeypatch.setattr(phi_online, "published_phi", real)
        st = require_upgrade(g)
        assert out["phi"] and st.online["decision"]["phi_map"] == out["phi_map"]
        phi = load_phi(decision_phi_path(g, st), old_fingerprint=st.old_space,
                       new_fingerprint=st.new_space)
        assert phi.fingerprint == out["phi_map"]
        BackfillSearcher.open(g, rule="ensemble", with_models=False)
