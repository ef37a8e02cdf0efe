"""Live feature changes through the upgrade job: a transform, local features, kill -9.

References: search during a change equals the brute-force merge of the two parts
(the items not yet changed searched in the old space, the others in the new one);
after ``finish`` the gallery equals a fresh index with the new features (same
spaces, primary, vectors / local features, answers); a SIGKILL in the middle of a
run loses nothing and the next run completes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import _tiny
from galleria.decision import open_searcher
from galleria.errors import CompatibilityError
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.transforms.attach import add_transformed_space, fit_on_gallery
from galleria.transforms.registry import create_transform
from galleria.upgrade.change import start_local, start_transform
from galleria.upgrade.job import finish_upgrade, run_upgrade, start_upgrade, upgrade_status
from galleria.upgrade.local_guard import LocalGuardConfig
from galleria.upgrade.local_search import LocalChangeSearcher
from galleria.upgrade.search import BackfillSearcher
from galleria.upgrade.state import UpgradeError, pending_space

HERE = Path(__file__).parent
N = 36
MERGED = LocalGuardConfig(guard="off")
"""The merged answers served unchecked: these tests are about the merge itself (the
guard that picks between it and the global answers: tests/test_upgrade_local_guard.py)."""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _tiny.noise_pngs(tmp_path_factory.mktemp("change-imgs"), N, 5)


@pytest.fixture()
def gallery(tmp_path, images):
    g = tmp_path / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    return g


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE)])
    return env


def _fitted(gallery, tmp_path, kind="pca-whiten", dim=8):
    with Gallery.open(gallery) as g:
        tr, _ = fit_on_gallery(g, kind, dim=dim)
    folder = tmp_path / f"T-{kind}"
    tr.save(folder)
    return tr, folder


def _by_id(g, space):
    keys, x = g.load_vectors(space)
    return dict(zip(g.ids_of(keys), x, strict=True))


def test_transform_change_search_and_finish_equal_a_fresh_apply(gallery, images, tmp_path):
    tr, folder = _fitted(gallery, tmp_path)
    state = start_transform(gallery, folder, seed=1, calib_size=12)
    assert state.change == "transform" and state.new_space == tr.output_fingerprint
    with pytest.raises(UpgradeError, match="already in progress"):
        start_transform(gallery, folder)
    rep = run_upgrade(gallery, limit=14, commit_every=5)
    assert rep.moved == 14
    st = upgrade_status(gallery)
    assert (st.done, st.in_both, st.in_neither, st.consistent) == (14, 14, 0, True)
    with Gallery.open(gallery) as g:
        old = _by_id(g, state.old_space)
        new = _by_id(g, state.new_space)
        assert len(old) == N and len(new) == 14  # the old space stays complete
        for i, v in new.items():  # new = T(stored base vector), no image read
            np.testing.assert_allclose(v, tr.transform(old[i][None])[0], atol=1e-6)
        # search: old part = items not yet transformed, new part = the others (exact)
        s = BackfillSearcher.open(g, rule="naive")
        q = np.stack([old[i] for i in sorted(old)[:6]])
        res = s.search_vectors(old_queries=q, new_queries=tr.transform(q), k=N)
        ids = sorted(old)
        score = {}
        for i in ids:
            score[i] = (tr.transform(q) @ new[i]) if i in new else q @ old[i]
        want = np.array([[ids[j] for j in np.argsort(-np.array([score[i][r] for i in ids]),
                                                     kind="stable")] for r in range(6)])
        assert (res.ids == want).all()
        assert s.search_vectors(old_queries=q, new_queries=tr.transform(q), k=5).ids.shape \
            == (6, 5)
        # auto: rescore -- the old part's shortlist scored in the new space (T of the stored
        # base vectors): with a shortlist deeper than the gallery it is the new space's
        # exact search over every item, from one forward pass (T(old(q)))
        s = BackfillSearcher.open(g)
        assert s.rule == "rescore" and s.new_extractor is None
        res = s.search_vectors(old_queries=q, k=10)
        allv = {i: (new[i] if i in new else tr.transform(old[i][None])[0]) for i in ids}
        sc = tr.transform(q) @ np.stack([allv[i] for i in ids]).T
        want = [[ids[j] for j in np.argsort(-row, kind="stable")[:10]] for row in sc]
        assert res.ids.tolist() == want
        np.testing.assert_allclose(res.scores, -np.sort(-sc, axis=1)[:, :10], atol=1e-5)
    run_upgrade(gallery)
    finish_upgrade(gallery)
    fresh = tmp_path / "fresh"
    index_images(images, fresh, extractor=_tiny.tiny(1))
    with Gallery.open(fresh) as f:
        add_transformed_space(f, tr, folder)
    with Gallery.open(gallery) as a, Gallery.open(fresh) as b:
        assert sorted(s.space for s in a.spaces()) == sorted(s.space for s in b.spaces())
        assert a.primary_space == b.primary_space == tr.output_fingerprint
        assert a.get_setting("upgrade") is None and not (gallery / "upgrade").exists()
        va, vb = _by_id(a, a.primary_space), _by_id(b, b.primary_space)
        assert sorted(va) == sorted(vb)
        assert max(float(np.abs(va[i] - vb[i]).max()) for i in va) < 1e-6
        q = np.stack([vb[i] for i in sorted(vb)[:8]])
        assert (a.search(q, 10, space=a.primary_space).ids
                == b.search(q, 10, space=b.primary_space).ids).all()
        assert a.space_info(a.primary_space).info == b.space_info(b.primary_space).info


def test_a_second_transform_replaces_the_first_at_finish(gallery, tmp_path):
    t1, f1 = _fitted(gallery, tmp_path, "pca-whiten", 8)
    with Gallery.open(gallery) as g:
        add_transformed_space(g, t1, f1)
        base = g.space_info(t1.output_fingerprint).info["base_space"]
    t2, f2 = _fitted(gallery, tmp_path, "pca", 6)
    state = start_transform(gallery, f2)
    assert state.old_space == t1.output_fingerprint and state.extra["drop_old"]
    run_upgrade(gallery)
    finish_upgrade(gallery)
    with Gallery.open(gallery) as g:
        assert {s.space for s in g.spaces()} == {base, t2.output_fingerprint}
        assert g.primary_space == t2.output_fingerprint
        assert len(list((gallery / "transforms").iterdir())) == 1  # t1's copy went with it


def test_transform_of_another_model_is_refused(gallery, tmp_path):
    rng = np.random.default_rng(0)

    tr = create_transform("pca", dim=4).fit(
        rng.standard_normal((50, 12)).astype(np.float32), fingerprint="someone-else@00")
    tr.save(tmp_path / "T")
    with pytest.raises(CompatibilityError):
        start_transform(gallery, tmp_path / "T")


def test_local_change_merges_global_and_local_and_finishes_as_a_fresh_index(
        gallery, images, tmp_path):
    loc = _tiny.tiny_local()
    state = start_local(gallery, "tiny-local", extractor=loc, seed=2, guard=MERGED)
    assert state.change == "local" and pending_space(state.to_dict()) == loc.fingerprint
    run_upgrade(gallery, limit=12, commit_every=4)
    with Gallery.open(gallery) as g:
        # the half-filled local space is not the default pipeline: the job's searcher answers
        s = open_searcher(g)
        assert isinstance(s, LocalChangeSearcher)
        done = set(g.ids(state.new_space))
        assert len(done) == 12 and g.count(state.old_space) == N
        paths = sorted(images.glob("*.png"))[:5]
        q, good, fails = s.embed_paths(paths, workers=1)
        assert good == list(range(5)) and not fails
        res = s.search(q, k=8)
        gq = q[state.old_space]
        # the global part never returns a done item; the local part only done items
        gpart = open_searcher(g, space=state.old_space).search(gq, k=N)
        not_done = [[i for i in row if i not in done] for row in gpart.ids]
        for r in range(5):
            got = [i for i in res.ids[r] if i is not None]
            assert len(got) == len(set(got)) == 8
            glob_hits = [i for i in got if i not in done]
            assert glob_hits == not_done[r][: len(glob_hits)]  # in global order
    run_upgrade(gallery)
    finish_upgrade(gallery)
    fresh = tmp_path / "fresh"
    index_images(images, fresh, extractor=_tiny.tiny(1), local_extractor=_tiny.tiny_local())
    with Gallery.open(gallery) as a, Gallery.open(fresh) as b:
        assert a.primary_space == b.primary_space == state.old_space
        assert sorted(s.space for s in a.spaces()) == sorted(s.space for s in b.spaces())
        assert a.get_setting("upgrade") is None
        sa, sb = open_searcher(a), open_searcher(b)
        assert type(sa).__name__ == type(sb).__name__ == "PipelineSearcher"
        paths = sorted(images.glob("*.png"))[:10]
        ra = sa.search_paths(paths, 10)[1]
        rb = sb.search_paths(paths, 10)[1]
        assert (ra.ids == rb.ids).all()
        np.testing.assert_allclose(ra.scores, rb.scores, atol=1e-6)


def test_local_change_at_zero_is_the_global_search(gallery, images):
    loc = _tiny.tiny_local()
    state = start_local(gallery, "tiny-local", extractor=loc)
    with Gallery.open(gallery) as g:
        s = BackfillSearcher.open(g)
        paths = sorted(images.glob("*.png"))[:4]
        _, res, _ = s.search_paths(paths, 6)
        plain = open_searcher(g, space=state.old_space)
        _, ref, _ = plain.search_paths(paths, 6)
        assert (res.ids == ref.ids).all()
        with pytest.raises(UpgradeError, match="does not apply"):
            BackfillSearcher.open(g, rule="psi")
        with pytest.raises(Exception, match="does not support the options"):
            s.search(s.embed_paths(paths, workers=1)[0], 5, qe=2)


KILLED_RUN = r"""
import sys, time
sys.path[:0] = [sys.argv[3]]
import _tiny
from galleria.upgrade import stored
from galleria.upgrade.job import run_upgrade
if sys.argv[2] == "transform":
    slow = stored._StoredVectors.vectors
    def vectors(self, ids):
        time.sleep(0.05)
        return slow(self, ids)
    stored._StoredVectors.vectors = vectors
    run_upgrade(sys.argv[1], batch_size=2, commit_every=2, workers=1)
else:
    class Slow(_tiny.TinyLocal):
        def embed_prepared(self, per_scale):
            time.sleep(0.05)
            return super().embed_prepared(per_scale)
    ext = Slow()
    ext.set_config(_tiny.tiny_local().config(), root=None)
    run_upgrade(sys.argv[1], extractor=ext, batch_size=2, commit_every=2, workers=1)
"""


@pytest.mark.parametrize("kind", ["transform", "local"])
def test_kill9_during_a_feature_change_loses_nothing(gallery, images, tmp_path, kind):
    if kind == "transform":
        _, folder = _fitted(gallery, tmp_path)
        state = start_transform(gallery, folder)
    else:
        state = start_local(gallery, "tiny-local", extractor=_tiny.tiny_local())
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(gallery), kind, str(HERE)],
                            env=_env())
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        with Gallery.open(gallery, readonly=True) as g:
            if g.count(state.new_space) >= 6:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    st = upgrade_status(gallery)
    assert 6 <= st.done < N and st.consistent and st.in_neither == 0
    with Gallery.open(gallery) as g:  # served meanwhile
        assert g.count(state.old_space) == N
    rep = run_upgrade(gallery, extractor=None if kind == "transform" else _tiny.tiny_local())
    assert rep.moved == N - st.done and rep.remaining == 0
    finish_upgrade(gallery)
    with Gallery.open(gallery) as g:
        assert g.count(state.new_space) == N and g.get_setting("upgrade") is None


def test_a_model_upgrade_after_a_change_starts_clean(gallery, tmp_path):
    _, folder = _fitted(gallery, tmp_path)
    start_transform(gallery, folder)
    with pytest.raises(UpgradeError, match="already in progress"):
        start_upgrade(gallery, "tiny-test", extractor=_tiny.tiny(2))


def test_searches_while_local_features_are_added_never_build_the_local_index(
        gallery, images, monkeypatch):
    """A search during a local change serves the job's last published local index: it
    never folds or loads one itself (a background thread swaps newer ones in), every
    answer is well formed and bounded in time, and the local part holds only items of
    a published snapshot. Seeded; the job runs in a thread with a slowed extractor."""
    import threading

    import galleria.store.reader as reader
    import galleria.upgrade.local_search as ls

    monkeypatch.setattr(ls, "PUBLISH_EVERY_S", 0.05)
    state = start_local(gallery, "tiny-local", extractor=_tiny.tiny_local(), seed=3, guard=MERGED)
    run_upgrade(gallery, limit=6, commit_every=2)  # a first published snapshot
    main = threading.get_ident()
    on_request: list[str] = []
    fold, load = reader.merge_view, ls.saved_snapshot

    def spy_fold(view, **kw):
        if view.kind == "local" and threading.get_ident() == main:
            on_request.append("fold")
        return fold(view, **kw)

    def spy_load(*a, **kw):
        if threading.get_ident() == main:
            on_request.append("load")
        return load(*a, **kw)

    class Slow(_tiny.TinyLocal):
        def embed_prepared(self, per_scale):
            time.sleep(0.03)
            return super().embed_prepared(per_scale)

    ext = Slow()
    ext.set_config(_tiny.tiny_local().config(), root=None)
    errors: list[BaseException] = []

    def job():
        try:
            run_upgrade(gallery, extractor=ext, batch_size=2, commit_every=2, workers=1)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with Gallery.open(gallery) as g:
        s = open_searcher(g)
        assert isinstance(s, LocalChangeSearcher) and s.published_folder() is not None
        q, _, _ = s.embed_paths(sorted(images.glob("*.png"))[:4], workers=1)
        monkeypatch.setattr(reader, "merge_view", spy_fold)
        monkeypatch.setattr(ls, "saved_snapshot", spy_load)
        worker = threading.Thread(target=job, daemon=True)
        worker.start()
        deadline, searches, slowest, seen = time.time() + 30, 0, 0.0, set()
        while worker.is_alive() and time.time() < deadline:
            t = time.perf_counter()
            res = s.search(q, k=8)
            slowest = max(slowest, time.perf_counter() - t)
            searches += 1
            pub = s._published
            assert pub is not None
            seen.add(pub.folder)
            for row in res.ids:
                got = [i for i in row if i is not None]
                assert len(got) == len(set(got)) == 8
        worker.join(timeout=max(1.0, deadline - time.time()))
        assert not worker.is_alive() and not errors, errors
        assert on_request == [] and searches >= 5 and slowest < 5.0
        assert s.loads >= 2 and len(seen) >= 2  # newer snapshots were swapped in meanwhile
        # at the end: the last publication holds every item, as a searcher opened now
        s.refresh_published(wait=True)
        assert s._published is not None and s._published.count == N
        ref = LocalChangeSearcher.open(g).search(q, k=8)
        assert (s.search(q, k=8).ids == ref.ids).all()
        assert g.count(state.new_space) == N


def test_many_publications_keep_one_loader_thread_and_bounded_connections(gallery, images):
    """Every snapshot the job publishes is loaded by the searcher's one loader thread:
    the open connections and threads stay bounded however many it loads (a thread per
    load kept one SQLite connection each until the gallery closed). Seeded, bounded."""
    import threading

    before = set(threading.enumerate())  # loaders of other tests' searchers left out
    start_local(gallery, "tiny-local", extractor=_tiny.tiny_local(), seed=4, guard=MERGED)
    run_upgrade(gallery, limit=4, commit_every=2)
    with Gallery.open(gallery) as g:
        s = open_searcher(g)
        assert isinstance(s, LocalChangeSearcher)
        q, _, _ = s.embed_paths(sorted(images.glob("*.png"))[:2], workers=1)
        s.search(q, k=4)
        conns, loads, folders = len(g.db._all), s.loads, set()
        for _ in range(10):
            run_upgrade(gallery, limit=2, commit_every=2)  # publishes a newer snapshot
            s.search(q, k=4)  # sees it: wakes the loader
            deadline = time.time() + 10
            while s._published.folder != s.published_folder() and time.time() < deadline:
                time.sleep(0.01)
            assert s._published.folder == s.published_folder()
            folders.add(s._published.folder)
        assert len(folders) == 10 and s.loads == loads + 10
        loaders = [t for t in set(threading.enumerate()) - before
                   if t.name == "galleria-local-load"]
        assert len(loaders) == 1 and len(g.db._all) <= conns + 1
        s.close()  # joins the loader, which closes its connection
        assert not loaders[0].is_alive() and len(g.db._all) <= conns
        s.search(q, k=4)  # a closed searcher still answers (with the snapshot in use)


def test_a_refused_snapshot_is_tried_once_and_the_loader_survives_any_error(
        gallery, images, monkeypatch):
    """A damaged published snapshot (a checksum mismatch) or a loader error of any type
    keeps the snapshot in use, is tried once however many searches follow, and the next
    publication loads. Seeded, bounded in time."""
    import json

    import galleria.upgrade.local_search as ls

    state = start_local(gallery, "tiny-local", extractor=_tiny.tiny_local(), seed=5, guard=MERGED)
    run_upgrade(gallery, limit=4, commit_every=2)
    calls: list[str] = []
    load = ls.saved_snapshot

    def spy(*a, **kw):
        calls.append("load")
        if boom:
            raise RuntimeError("unexpected")
        return load(*a, **kw)

    def settle(n):
        deadline = time.time() + 10
        while (len(calls) < n or s._failed != s.published_folder()) and time.time() < deadline:
            s.search(q, k=4)
            time.sleep(0.01)
        for _ in range(5):  # more searches: no new load of a refused folder
            s.search(q, k=4)
            time.sleep(0.01)

    boom = False
    with Gallery.open(gallery) as g:
        s = open_searcher(g)
        q, _, _ = s.embed_paths(sorted(images.glob("*.png"))[:2], workers=1)
        first = s._published.folder
        monkeypatch.setattr(ls, "saved_snapshot", spy)
        try:
            run_upgrade(gallery, limit=2, commit_every=2)  # a newer snapshot, then damaged
            folder, files = g.db.one("SELECT folder, files FROM index_snapshots WHERE space=?",
                                     (state.new_space,))
            name = max(json.loads(files), key=lambda n: json.loads(files)[n]["nbytes"])
            path = g.path / folder / name
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
            settle(1)
            assert len(calls) == 1 and s._failed == folder and s._published.folder == first
            boom = True  # an error no loader expects: logged, the thread lives on
            run_upgrade(gallery, limit=2, commit_every=2)
            settle(2)
            assert len(calls) == 2 and s._published.folder == first
            assert s._loader is not None and s._loader.is_alive()
            boom = False
            run_upgrade(gallery, limit=2, commit_every=2)  # the next publication loads
            deadline = time.time() + 10
            while s._published.folder != s.published_folder() and time.time() < deadline:
                s.search(q, k=4)
                time.sleep(0.01)
            assert len(calls) == 3 and s._published.folder == s.published_folder() != first
        finally:
            s.close()
        assert not s._loader.is_alive()
