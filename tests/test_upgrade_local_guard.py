"""The old-answers guard of a local-feature change (upgrade/local_guard.py).

References: on a gallery where local features find the pseudo-queries' source
items (seeded dead-leaves textures, SIFT) the check serves the merged answers
once they beat the global ones; on one where they cannot (flat colours: SIFT
finds no keypoint) it keeps the global answers, which are then exactly the plain
global search (the same searcher's answers and a brute-force cosine ranking).
A SIGKILL during the check (or while its pseudo-queries are made) publishes
nothing half-made and the next run publishes a complete decision. Searches
while decisions are published see one of the two answers, never a torn state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _tiny
from galleria.decision import open_searcher
from galleria.extract.job import index_images
from galleria.extractors.registry import create_extractor
from galleria.images.pseudo import clutter
from galleria.store.gallery import Gallery
from galleria.upgrade.change import start_local
from galleria.upgrade.job import run_upgrade, upgrade_status
from galleria.upgrade.local_guard import (
    LocalGuardConfig,
    check_local,
    job_local_pseudo,
    publish_decision,
)
from galleria.upgrade.local_search import GLOBAL, HYBRID, MERGED, LocalChangeSearcher
from galleria.upgrade.state import require_upgrade

HERE = Path(__file__).parent
N = 24


def _textures(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(N):
        clutter((160, 160), rng, 60).save(root / f"{i:02d}.png")
    return root


def _flat(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for i in range(N):
        Image.fromarray(np.broadcast_to(rng.integers(0, 256, 3), (96, 96, 3))
                        .astype(np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return _textures(tmp_path_factory.mktemp("textures"))


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return _flat(tmp_path_factory.mktemp("flat"))


def _gallery(images: Path, at: Path) -> Path:
    index_images(images, at, extractor=_tiny.tiny(1))
    start_local(at, "sift", extractor=create_extractor("sift"), seed=0,
                guard=LocalGuardConfig(recheck_every=0.25))  # a check every 6 items
    return at


def _decision(g: Path) -> dict:
    with Gallery.open(g, readonly=True) as gal:
        return dict(require_upgrade(gal).online.get("decision") or {})


def _complete(d: dict, moved: int) -> None:
    assert d["checked"] and d["kind"] == "local" and d["moved"] == moved
    assert d["rule"] in (MERGED, GLOBAL, HYBRID) and set(d["scores"]) == {MERGED, GLOBAL, HYBRID}
    assert d["verdict"]["merged_vs_old"] in ("better", "worse", "same")
    # the rule served is calibrated (a rule that never ranks a source item in its top
    # 10, the merge on flat colours, cannot be: no positive)
    assert d["queries"] == N and d["rule"] in d["probability"]["rules"]


@pytest.mark.parametrize("kind", ["helps", "cannot-help"])
def test_the_guard_serves_the_merge_only_once_it_beats_the_global_answers(
        kind, textures, flat, tmp_path):
    images = textures if kind == "helps" else flat
    g = _gallery(images, tmp_path / "g")
    run_upgrade(g, limit=0)  # the job's first check: before any item has local features
    d0 = _decision(g)
    _complete(d0, 0)
    assert d0["rule"] == GLOBAL and d0["verdict"]["merged_vs_old"] == "same"
    run_upgrade(g, limit=N // 2, batch_size=6, commit_every=6)
    assert _decision(g)["moved"] == N // 2 and _decision(g)["checks"] == 3
    run_upgrade(g, batch_size=6, commit_every=6)
    d = _decision(g)
    _complete(d, N)
    assert upgrade_status(g).to_dict()["online_psi"]["rule"] == d["rule"]
    paths = sorted(images.glob("*.png"))[:6]
    with Gallery.open(g) as gal:
        s = open_searcher(gal)
        assert isinstance(s, LocalChangeSearcher) and s.rule == d["rule"]
        assert s.match_calibration() is not None  # probabilities of the rule served
        _, res, _ = s.search_paths(paths, 5)
        if kind == "helps":
            assert d["rule"] != GLOBAL and d["verdict"]["merged_vs_old"] == "better"
            # the merge scores each query once for its top-k and its cohort similarities
            q = create_extractor("sift").embed_images([Image.open(p).convert("RGB")
                                                       for p in paths])
            index, keys = s._published.index, s._published.item_keys[::2]
            res2, sims = index.search_with_similarities(q, 5, keys)
            ref = index.search(q, 5)
            assert (res2.ids == ref.ids).all() and np.array_equal(res2.scores, ref.scores)
            assert np.array_equal(sims, np.stack([index.similarities(f, keys) for f in q]))
            assert d["scores"][d["rule"]]["mrr"] > d["scores"][GLOBAL]["mrr"] + 20
            return
        # the merge is far worse; hybrid ties with the global answers (nothing verifies)
        assert d["rule"] == GLOBAL and d["verdict"]["merged_vs_old"] in ("worse", "same")
        assert d["scores"][MERGED]["mrr"] < d["scores"][GLOBAL]["mrr"] - 20
        assert s.spaces == [s.state.old_space]  # no local query features computed
        plain = open_searcher(gal, space=s.state.old_space)
        _, ref, _ = plain.search_paths(paths, 5)
        assert (res.ids == ref.ids).all()
        np.testing.assert_allclose(res.scores, ref.scores, atol=1e-6)
        keys, vecs = gal.load_vectors(s.state.old_space)  # brute force
        q = _tiny.tiny(1).embed_images([Image.open(p).convert("RGB") for p in paths])
        order = np.argsort(-(q @ vecs.T), axis=1, kind="stable")[:, :5]
        assert (np.array(gal.ids_of(keys), dtype=object)[order] == res.ids).all()


KILLED = r"""
import pathlib, sys, time
sys.path[:0] = [sys.argv[3]]
import _tiny
import galleria.upgrade.local_guard as lg
from galleria.upgrade.job import run_upgrade
marker = pathlib.Path(sys.argv[2])
def stall(*a, **kw):
    marker.write_text("in")
    time.sleep(60)
if sys.argv[4] == "check":
    lg.decide_with_old = stall
else:
    lg._save_local = stall
run_upgrade(sys.argv[1], batch_size=4, commit_every=4, workers=1)
"""


@pytest.mark.parametrize("stage", [pytest.param("pseudo-queries", marks=pytest.mark.slow),
                                   "check"])
def test_kill9_during_the_check_resumes_and_publishes_a_complete_decision(
        stage, textures, tmp_path):
    g = _gallery(textures, tmp_path / "g")
    if stage == "check":
        run_upgrade(g, limit=0)  # a decision at 0 %; the run below is killed in a recheck
    before = _decision(g)
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE)]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(g), str(marker), str(HERE),
                             "check" if stage == "check" else "pseudo"], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not marker.is_file():
        time.sleep(0.02)
    assert proc.poll() is None and marker.is_file(), "the run did not reach the check"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert _decision(g) == before  # nothing half-published
    folder = g / "upgrade" / "online" / "local-pseudo"
    assert (folder / "pseudo.json").is_file() == (stage == "check")
    with Gallery.open(g) as gal:
        moved = gal.count(require_upgrade(gal).new_space)
        assert (moved > 0) == (stage == "check")
    run_upgrade(g, batch_size=4, commit_every=4)
    d = _decision(g)
    _complete(d, N)
    assert d["rule"] != GLOBAL and d["checks"] >= 2


def test_searches_while_decisions_are_published_see_one_whole_rule(flat, tmp_path):
    """Readers open the default searcher and search while a thread publishes checks
    (the global answers: the merge cannot help on flat colours) alternating with the
    same decision naming the merge: every answer is exactly the reference of the rule
    the reader's searcher resolved. Seeded, bounded in time."""
    g = _gallery(flat, tmp_path / "g")
    run_upgrade(g, limit=N // 2, batch_size=4, commit_every=4)
    imgs = [Image.open(p).convert("RGB") for p in sorted(flat.glob("*.png"))[:5]]
    qg = _tiny.tiny(1).embed_images(imgs)
    ql = create_extractor("sift").embed_images(imgs)
    with Gallery.open(g) as gal:
        refs = {}
        for rule in (GLOBAL, MERGED):
            s = LocalChangeSearcher(gal, rule=rule)
            refs[rule] = s.search_queries(qg, ql, k=5).ids
            s.close()
        assert not (refs[GLOBAL] == refs[MERGED]).all()
        state = require_upgrade(gal)
        pseudo = job_local_pseudo(gal, state, LocalGuardConfig(), _tiny.tiny(1),
                                  create_extractor("sift"))
    stop, errors, seen = threading.Event(), [], {GLOBAL: 0, MERGED: 0}
    published = []

    def publisher():
        try:
            with Gallery.open(g) as gal:
                n = 0
                while not stop.is_set() and n < 8:
                    d = check_local(gal, pseudo, LocalGuardConfig())
                    published.append(d["rule"])
                    publish_decision(gal, {**d, "rule": MERGED})
                    published.append(MERGED)
                    n += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def reader(seed):
        rng = np.random.default_rng(seed)
        try:
            with Gallery.open(g) as gal:
                while not stop.is_set():
                    s = LocalChangeSearcher.open(gal, with_models=False)
                    try:
                        k = int(rng.integers(1, 6))
                        ids = s.search_queries(qg, ql if s.rule == MERGED else None, k=k).ids
                    finally:
                        s.close()
                    assert (ids == refs[s.rule][:, :k]).all(), s.rule
                    seen[s.rule] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publisher, daemon=True)] + [
        threading.Thread(target=reader, args=(n,), daemon=True) for n in range(2)]
    for t in threads:
        t.start()
    threads[0].join(timeout=20)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert set(published) == {GLOBAL, MERGED} and min(seen.values()) >= 1, (published, seen)
