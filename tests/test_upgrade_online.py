"""Online psi (ridge, pseudo-query check, publication) and the query-driven order.

References: the ridge solution and its GCV score against the normal equations
and an explicit hat matrix; the check's reciprocal ranks against a brute-force
merge of the stored vectors; the publication survives a SIGKILL at every point
of a fit; the answers record against what was written (torn lines, rotation,
concurrent writers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _tiny
from galleria.errors import CompatibilityError, InputError
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.job import finish_upgrade, run_upgrade, start_upgrade, upgrade_status
from galleria.upgrade.merge import merged_scores
from galleria.upgrade.online import (
    OnlineConfig,
    all_pairs,
    decide,
    decide_with_old,
    next_fit_at,
    online_folder,
)
from galleria.upgrade.pairs import load_pseudo_pairs
from galleria.upgrade.psi import load_cross_map
from galleria.upgrade.querylog import (
    LOG_NAME,
    ROTATED_NAME,
    add_neighbours,
    front_load,
    query_priorities,
    read_answers,
    record_answers,
)
from galleria.upgrade.ridge import RidgePsi, ridge_gcv
from galleria.upgrade.search import BackfillSearcher, resolve_rule
from galleria.upgrade.state import decision_psi_path, require_upgrade
from galleria.validate import l2_normalize

HERE = Path(__file__).parent
N = 64
SMALL = OnlineConfig(first_at=16, growth=2.0, max_pairs=40, pseudo_queries=12, seed=0)


# --------------------------------------------------------------------------- ridge
def test_ridge_matches_the_normal_equations_and_gcv_an_explicit_hat_matrix():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 7))
    y = x @ rng.standard_normal((7, 3)) + 0.3 * rng.standard_normal((40, 3))
    x -= x.mean(0)
    y -= y.mean(0)
    w, alpha, scores = ridge_gcv(x, y, alphas=(0.01, 0.1, 1.0))
    np.testing.assert_allclose(w, np.linalg.solve(x.T @ x + alpha * np.eye(7), x.T @ y),
                               rtol=1e-4, atol=1e-5)
    scale = float(np.mean(np.linalg.svd(x, compute_uv=False) ** 2))
    for rel, got in scores.items():
        a = float(rel) * scale
        h = x @ np.linalg.solve(x.T @ x + a * np.eye(7), x.T)
        resid = y - h @ y
        want = float((resid ** 2).sum()) / 40 / (1 - np.trace(h) / 40) ** 2
        assert got == pytest.approx(want, rel=1e-6)
    assert alpha == pytest.approx(float(min(scores, key=scores.get)) * scale)


def test_ridge_psi_learns_a_linear_map_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    new = l2_normalize(rng.standard_normal((500, 16)).astype(np.float32))
    old = l2_normalize((new @ rng.standard_normal((16, 10))).astype(np.float32))
    psi = RidgePsi().fit(new[:400], old[:400], new_fingerprint="n@1", old_fingerprint="o@1")
    cos = np.sum(psi.transform(new[400:]) * old[400:], axis=1)
    assert cos.mean() > 0.99
    psi.save(tmp_path / "p")
    back = load_cross_map(tmp_path / "p", old_fingerprint="o@1", new_fingerprint="n@1")
    assert isinstance(back, RidgePsi) and back.fingerprint == psi.fingerprint
    np.testing.assert_array_equal(back.transform(new[:3]), psi.transform(new[:3]))
    with pytest.raises(CompatibilityError):
        load_cross_map(tmp_path / "p", old_fingerprint="other@2")
    with pytest.raises(InputError, match="label-free"):
        RidgePsi().fit(new, old, labels=np.zeros(500))
    # a capped fit uses a seeded sample, the same one each time
    a = RidgePsi(max_pairs=100, seed=3).fit(new, old)
    b = RidgePsi(max_pairs=100, seed=3).fit(new, old)
    assert a.fingerprint == b.fingerprint and a.info_["fitted_on"] == 100


# ------------------------------------------------------------------ decision, schedule
def test_decide_switches_only_on_a_gain_unlikely_to_be_noise():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    better = np.minimum(1.0, base + 0.05 + 0.02 * rng.standard_normal(200))
    noisy = base + 0.05 * rng.standard_normal(200)
    rule, scores = decide({"rank-merge": base, "psi": noisy, "fused": better})
    assert rule == "fused" and scores["fused"]["lower"] > 0
    assert decide({"rank-merge": base, "psi": noisy})[0] == "rank-merge"
    assert decide({"rank-merge": base, "fused": base - 0.1})[0] == "rank-merge"
    with pytest.raises(InputError):
        decide({"psi": base})


def test_the_old_answers_stay_until_a_merge_rule_beats_them():
    rng = np.random.default_rng(1)
    old = rng.random(300)
    worse = np.maximum(0.0, old - 0.05 + 0.02 * rng.standard_normal(300))
    better = np.minimum(1.0, old + 0.05 + 0.02 * rng.standard_normal(300))
    tied = old + 0.05 * rng.standard_normal(300)
    rr = {"old-only": old, "rank-merge": worse}
    rule, scores, verdict = decide_with_old(rr)
    assert rule == "old-only" and verdict["merged_vs_old"] == "worse"
    assert scores["old-only"]["gain"] > 0  # old-only's gain over the merge rule
    assert decide_with_old({"old-only": old, "rank-merge": tied})[0] == "old-only"
    # unless-worse serves the merge when the check cannot tell them apart
    assert decide_with_old({"old-only": old, "rank-merge": tied},
                           mode="unless-worse")[0] == "rank-merge"
    rule, _, verdict = decide_with_old({"old-only": old, "rank-merge": old, "both": better})
    assert rule == "both" and verdict == {"merged_vs_old": "better", "merge_rule": "both",
                                          "gain": verdict["gain"], "n": 300}
    assert decide_with_old(rr, mode="off")[0] == "rank-merge"
    with pytest.raises(InputError):
        decide_with_old(rr, mode="sometimes")


def test_schedule_is_geometric_and_capped():
    c = OnlineConfig(first_at=128, growth=2.0, max_pairs=1000)
    pts, m = [], None
    for _ in range(8):
        m = next_fit_at(c, m)
        pts.append(m)
    assert pts[:4] == [128, 256, 512, 1000] and pts[4] > 1000  # past the cap: no more fits
    with pytest.raises(InputError):
        OnlineConfig(growth=1.0)


# ------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _tiny.noise_pngs(tmp_path_factory.mktemp("online-imgs"), N, 3)


@pytest.fixture()
def gallery(tmp_path, images):
    g = tmp_path / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2, dim=10), online=SMALL,
                  order="random", calib_size=20)
    return g


def test_run_fits_checks_and_publishes_on_the_schedule(gallery):
    with Gallery.open(gallery) as g:  # the old model's answers before anything moves
        st = require_upgrade(g)
        assert resolve_rule("auto", g, st) == "old-only"  # old answers until a check
        k0, v0 = g.load_vectors(st.old_space)
        ids0 = list(g.ids_of(k0))
    run_upgrade(gallery, limit=40, commit_every=8)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        # fits at 16, 32 and 40 pairs (the cohort's 20 + the training pairs); rechecks
        # between fits keep the fit schedule
        assert d["fits"] >= 2 and d["pairs"] == 40 and d["checked"]
        assert d["source"] in ("online", "recheck") and d["checks"] >= d["fits"]
        assert d["moved"] == 40
        assert set(d["scores"]) == {"old-only", "both", "ensemble", "rank-merge", "psi",
                                    "fused"}
        # old-only during an online job = the old model alone on the whole gallery
        # (the moved items by the old vectors the job kept): a brute-force reference
        q = l2_normalize(np.random.default_rng(5).standard_normal((6, 12)).astype(np.float32))
        got = BackfillSearcher(g, rule="old-only").search_vectors(old_queries=q, k=10)
        want = np.argsort(-(q @ v0.T), axis=1, kind="stable")[:, :10]
        assert [list(r) for r in got.ids] == [[ids0[j] for j in r] for r in want]
        # both: moved items by the mean of the Z-normed old and new scores, others by old
        from galleria.upgrade.merge import CohortNorm, cohort_stats

        _, c_old, c_new = all_pairs(g)
        norm = CohortNorm(c_old, c_new, top=10)
        qn = l2_normalize(np.random.default_rng(6).standard_normal((6, 10)).astype(np.float32))
        got = BackfillSearcher(g, rule="both", calibration=norm).search_vectors(
            old_queries=q, new_queries=qn, k=20)
        kn, vn = g.load_vectors(st.new_space)
        new_of = dict(zip(g.ids_of(kn), vn, strict=True))
        mo, so = cohort_stats(q, norm.old_cohort, top=norm.top)
        mn, sn = cohort_stats(qn, norm.new_cohort, top=norm.top)
        zo = (q @ v0.T - mo) / so
        zn = (qn @ np.stack([new_of.get(i, np.zeros(10, np.float32)) for i in ids0]).T
              - mn) / sn
        moved = np.array([i in new_of for i in ids0])
        ref = np.where(moved, 0.5 * (zo + zn), zo)
        want = np.argsort(-ref, axis=1, kind="stable")[:, :20]
        assert [list(r) for r in got.ids] == [[ids0[j] for j in r] for r in want]
        p = decision_psi_path(g, st)
        psi = load_cross_map(p, old_fingerprint=st.old_space, new_fingerprint=st.new_space)
        assert psi.fingerprint == d["map"]
        assert len(list(online_folder(g).glob("psi-*"))) <= 2  # current and previous only
        ids, o, n = all_pairs(g)
        assert len(ids) == 40 == len(set(ids)) and o.shape == (40, 12) and n.shape == (40, 10)
        # the pseudo-queries were embedded before the first move and join the cohort
        extra = load_pseudo_pairs(g.path)
        assert extra is not None and extra[0].shape == (12, 12)
        # the check's rank-merge MRR is that of a brute-force merge of the stored vectors
        meta = json.loads((online_folder(g) / "pseudo" / "pseudo.json").read_text())
        ko, vo = g.load_vectors(st.old_space)
        kn, vn = g.load_vectors(st.new_space)
        gid = list(g.ids_of(ko)) + list(g.ids_of(kn))
        go = np.concatenate([vo, np.zeros((len(kn), 12), np.float32)])
        gn = np.concatenate([np.zeros((len(ko), 10), np.float32), vn])
        mask = np.arange(len(gid)) >= len(ko)
        # the cohort: 20 pairs + 12 pseudo-queries < 50, so raw scores (as logged)
        s = merged_scores(extra[0] @ go.T, extra[1] @ gn.T, mask)
        truth = np.array([gid.index(i) for i in meta["ids"]])
        rank = (s > s[np.arange(len(truth)), truth][:, None]).sum(1)
        assert d["scores"]["rank-merge"]["mrr"] == pytest.approx(
            100 * float(np.mean(1 / (1 + rank))), abs=1e-3)
        assert resolve_rule("auto", g, st) == d["rule"]
        s_auto = BackfillSearcher.open(g)
        assert s_auto.rule == d["rule"]
    assert upgrade_status(gallery).to_dict()["online_psi"]["fits"] == d["fits"]
    run_upgrade(gallery)
    finish_upgrade(gallery)
    assert not (gallery / "upgrade").exists()


def test_a_psi_that_loses_the_check_is_not_used(gallery):
    """Force a decision with a psi that maps every query to one point: rank-merge stays."""
    run_upgrade(gallery, limit=20, commit_every=10)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        old_q, new_q = _tiny.tiny(1), _tiny.tiny(2, dim=10)
        bad = RidgePsi().fit(np.eye(10, dtype=np.float32)[np.arange(20) % 10],
                             np.tile(l2_normalize(np.ones((1, 12), np.float32)), (20, 1)),
                             new_fingerprint=st.new_space, old_fingerprint=st.old_space)
        from galleria.upgrade.online import check_and_publish

        folder = online_folder(g) / "psi-bad"
        bad.save(folder)
        d = check_and_publish(g, bad, folder, config=SMALL, old_model=old_q, new_model=new_q,
                              source="test")
        # the best merge rule is rank-merge; served only if it beats the old answers
        assert d["checked"] and d["verdict"]["merge_rule"] == "rank-merge"
        assert d["rule"] == ("rank-merge" if d["verdict"]["merged_vs_old"] == "better"
                             else "old-only")
        assert d["scores"]["psi"]["mrr"] < d["scores"]["rank-merge"]["mrr"]
        assert BackfillSearcher.open(g).rule == d["rule"]


KILL_DRIVER = r"""
import os, signal, sys
sys.path[:0] = [sys.argv[3]]
import _tiny
import galleria.upgrade.online as online
import galleria.io.estimator as est
from galleria.upgrade.job import run_upgrade

kill_at, n = int(sys.argv[2]), [0]
# the run's first check (before any item moves) happens here, not instrumented
run_upgrade(sys.argv[1], commit_every=8, limit=1)

def tick():
    n[0] += 1
    if n[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        tick()
        out = f(*a, **k)
        tick()
        return out
    setattr(mod, name, g)

for mod, name in ((online.RidgePsi, "fit"), (est, "write_bytes"), (est, "save_header"),
                  (online, "save_state"), (online, "check_rules"), (online, "publish")):
    wrap(mod, name)
run_upgrade(sys.argv[1], commit_every=8, limit=15)  # one fit, at 16 pairs
print(n[0])
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE)])
    return env


@pytest.mark.parametrize("sweep", [pytest.param("all", marks=pytest.mark.slow), "some"])
def test_kill9_during_an_online_fit(gallery, tmp_path, sweep):
    """SIGKILL at points of a fit (every point: slow; three spread over it by default)."""
    import shutil

    def drive(path, kill_at):
        return subprocess.run([sys.executable, "-c", KILL_DRIVER, str(path), str(kill_at),
                               str(HERE)], env=_env(), capture_output=True, text=True,
                              timeout=120)

    count = tmp_path / "count"
    shutil.copytree(gallery, count)
    out = drive(count, -1)
    assert out.returncode == 0, out.stderr
    events = int(out.stdout.strip().splitlines()[-1])
    assert events >= 10
    points = range(1, events + 1) if sweep == "all" else \
        sorted({1, events // 2, events - 1})
    for kill_at in points:
        g = tmp_path / f"k{kill_at}"
        shutil.copytree(gallery, g)
        assert drive(g, kill_at).returncode == -signal.SIGKILL
        with Gallery.open(g) as gal:  # whatever is published is complete
            st = require_upgrade(gal)
            d = st.online.get("decision")
            if d and d.get("psi"):  # (the first check, before any fit, publishes no psi)
                p = decision_psi_path(gal, st)
                assert p is not None
                assert load_cross_map(p, old_fingerprint=st.old_space,
                                      new_fingerprint=st.new_space).fingerprint == d["map"]
            if d and d.get("phi"):  # the forward map of rule ensemble, published with it
                from galleria.upgrade.phi import published_phi

                assert published_phi(gal, st).fingerprint == d["phi_map"]
            BackfillSearcher.open(gal)  # search opens with whatever is there
        rep = run_upgrade(g, commit_every=8, limit=8)  # the resumed run fits (again) and goes on
        assert rep.moved == 8
        with Gallery.open(g) as gal:
            st = require_upgrade(gal)
            assert st.online["decision"]["pairs"] >= 16
            assert decision_psi_path(gal, st) is not None
            assert len(all_pairs(gal)[0]) == 24


# ------------------------------------------------------------------ answers record
def test_answers_record_is_bounded_atomic_and_skips_torn_lines(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    assert record_answers(g, [["a", "b"]]) is False  # no job: nothing recorded
    (g / "upgrade").mkdir()
    assert record_answers(g, [["a", "b", None], [None]], now=100.0)
    assert read_answers(g) == [(100.0, ["a", "b"])]
    path = g / "upgrade" / "queries" / LOG_NAME
    with open(path, "ab") as fh:
        fh.write(b'{"t": 101, "ids": ["c"')  # a line torn by a crash
    record_answers(g, [["d"]], now=102.0)
    assert [ids for _, ids in read_answers(g)] == [["a", "b"], ["d"]]
    # bounded: past max_bytes the record rotates (at most two files)
    for n in range(200):
        record_answers(g, [[f"x{n}"] * 10], now=200.0 + n, max_bytes=2000)
    sizes = [p.stat().st_size for p in (g / "upgrade" / "queries").glob("answers*.jsonl")]
    assert len(sizes) == 2 and all(s <= 2000 + 300 for s in sizes)
    assert (g / "upgrade" / "queries" / ROTATED_NAME).is_file()
    # concurrent writers: every line intact
    shutil_rm = [p.unlink() for p in (g / "upgrade" / "queries").glob("answers*")]
    assert len(shutil_rm) == 2

    def writer(w):
        for n in range(100):
            record_answers(g, [[f"w{w}-{n}"] * 10], now=float(n))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs = read_answers(g)
    assert len(recs) == 400 and all(len(set(ids)) == 1 and len(ids) == 10 for _, ids in recs)


def test_priorities_neighbours_and_order():
    prio = query_priorities([(0.0, ["a", "b"]), (3600.0, ["b", "c"])], now=3600.0)
    assert prio == pytest.approx({"a": 0.5, "b": 0.25 + 1.0, "c": 0.5})
    near = add_neighbours(prio, {"b": ["d", "e", "a"]}, factor=0.5)
    assert near == pytest.approx({"d": 0.625, "e": 0.3125, "a": 1.25 / 6})
    # answered items first (their own weight plus any as a neighbour), then neighbours
    order = front_load(["z", "e", "a", "y", "d", "b", "c"], prio, near)
    assert order == ["b", "a", "c", "d", "e", "z", "y"]
    assert front_load(["z", "y"], {}) == ["z", "y"]


def test_queries_order_moves_what_users_looked_at_first(tmp_path, images):
    g = tmp_path / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    with Gallery.open(g) as gal:
        keys, x = gal.load_vectors(gal.primary_space)
        ids = list(gal.ids_of(keys))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2), online=OnlineConfig(enabled=False))
    hot = ["05.png", "17.png", "33.png"]
    assert record_answers(g, [hot])
    rep = run_upgrade(g, limit=3, commit_every=1)
    assert rep.order == "queries" and rep.moved == 3
    with Gallery.open(g) as gal:
        assert sorted(gal.ids(require_upgrade(gal).new_space)) == sorted(hot)
    # a later run: the answered items' neighbours (by their old vectors, kept in the job's
    # pairs) come before the rest
    run_upgrade(g, limit=5, commit_every=1)
    rest = [n for n, i in enumerate(ids) if i not in hot]
    hv = x[[ids.index(i) for i in hot]]
    near = {ids[rest[j]] for row in np.argsort(-(hv @ x[rest].T), axis=1)[:, :5] for j in row}
    with Gallery.open(g) as gal:
        moved = set(gal.ids(require_upgrade(gal).new_space)) - set(hot)
    assert len(moved) == 5 and moved <= near


def test_the_service_records_what_it_answered_during_a_job(tmp_path, images):
    """The engine's one hook: each answer of a search lands in the job's record."""
    import io

    from galleria.service.engine import Engine, QuerySpec, ServiceConfig

    g = tmp_path / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    engine = Engine(ServiceConfig(gallery=g, warm_up=False))
    try:
        buf = io.BytesIO()
        Image.open(images / "07.png").save(buf, format="PNG")
        engine.search([QuerySpec(image=buf.getvalue())], k=4)
        assert read_answers(g) == []  # no job: nothing recorded
        start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2), online=OnlineConfig(enabled=False))
        out = engine.search([QuerySpec(image=buf.getvalue())], k=4)
        recs = read_answers(g)
        assert len(recs) == 1 and recs[0][1] == [h["id"] for h in out[0]["results"]]
    finally:
        engine.stop()


def test_kept_old_vectors_stay_consistent_while_threads_search_and_pairs_grow(tmp_path):
    """The service searches from several threads while the job appends pair chunks:
    every search sees one consistent snapshot and equals brute force over it."""
    import threading
    from types import SimpleNamespace

    from galleria.upgrade.oldonly import MovedOldVectors
    from galleria.upgrade.pairs import PairStore
    from galleria.upgrade.state import job_folder

    rng = np.random.default_rng(7)
    n, d = 240, 8
    ids = [f"i{j:03d}" for j in range(n)]
    old = l2_normalize(rng.standard_normal((n, d)).astype(np.float32))
    stores = [PairStore(job_folder(tmp_path) / "pairs"),
              PairStore(job_folder(tmp_path) / "online" / "pairs")]
    kept = MovedOldVectors(tmp_path)
    q = l2_normalize(rng.standard_normal((3, d)).astype(np.float32))
    moved = {"n": 0}
    errors: list[BaseException] = []

    def view() -> SimpleNamespace:
        m = moved["n"]
        keys = np.arange(m, dtype=np.int64)
        return SimpleNamespace(count=m, keys=lambda: keys,
                               ids=SimpleNamespace(lookup=lambda k: np.asarray(
                                   [ids[int(j)] for j in k], dtype=object)))

    def searcher() -> None:
        try:
            for _ in range(60):
                m = moved["n"]
                res = kept.search(q, 5, view())
                if res is None:  # pairs not yet written for the moved items: allowed
                    continue
                got = [[i for i in row if i is not None] for row in res.ids]
                ref = np.argsort(-(q @ old[:m].T), axis=1, kind="stable")[:, :5]
                assert got == [[ids[j] for j in row] for row in ref] or moved["n"] != m
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for lo in range(0, n, 16):  # the job: pairs first, then the move
        stores[(lo // 16) % 2].append(ids[lo:lo + 16], old[lo:lo + 16], old[lo:lo + 16])
        moved["n"] = lo + 16
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    got_ids, got_old, got_new = kept.load()
    assert len(got_ids) == len(got_old) == len(got_new) == n == len(set(got_ids))
