"""``upgrade finish`` against an ``upgrade run`` that starts while it switches.

finish refuses while a run holds the job's run lock; a run that starts *after*
that test but before the switch must not write the job record after the switch
(its last check publishes a decision: read the record, write it back). If it
could, the gallery would hold the record of a job whose old space finish drops:
a zombie upgrade every search then opens a backfill searcher for. Reference:
after both, no job record is left and the default searcher answers as a
brute-force search of the new vectors. Two pause points (finish before its
switch, the run before its publish write), each bounded in time; tiny models.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from PIL import Image

import _tiny
import galleria.upgrade.online as online_mod
from galleria.decision.open import open_searcher
from galleria.errors import GalleriaError
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.job import finish_upgrade, run_upgrade, start_upgrade
from galleria.upgrade.online import OnlineConfig, publish
from galleria.upgrade.state import STATE_KEY, require_upgrade

N = 32


def test_a_run_started_while_finish_switches_leaves_no_job_record(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", N, 7)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    new_model = _tiny.tiny(2)
    start_upgrade(g, "tiny-test", extractor=new_model, order="random", calib_size=N,
                  online=OnlineConfig(first_at=16, growth=4.0, pseudo_queries=16, seed=0,
                                      recheck_every=0.5))
    run_upgrade(g, commit_every=8)
    with Gallery.open(g) as gal:  # a run killed before its last check: the next one checks
        d = require_upgrade(gal).online["decision"]
        publish(gal, {**d, "moved": N - 8, "checks": d["checks"] - 1})

    f_paused, f_go, r_publishing, r_go = (threading.Event() for _ in range(4))
    threads: dict[str, threading.Thread] = {}
    real_update, real_save = Gallery.update_settings, online_mod.save_state

    def update_settings(self, *a, **kw):
        if threading.current_thread() is threads.get("finish") and not f_paused.is_set():
            f_paused.set()  # finish has passed its run test, before its switch
            assert f_go.wait(20)
        return real_update(self, *a, **kw)

    def save_state(gallery, state):
        if threading.current_thread() is threads.get("run"):
            r_publishing.set()  # the run's check read the record, about to write it
            r_go.wait(20)
        return real_save(gallery, state)

    monkeypatch.setattr(Gallery, "update_settings", update_settings)
    monkeypatch.setattr(online_mod, "save_state", save_state)
    errors: dict[str, BaseException] = {}

    def call(name, fn):
        try:
            fn()
        except BaseException as exc:  # reported below
            errors[name] = exc

    threads["finish"] = threading.Thread(target=call, args=("finish", lambda: finish_upgrade(g)),
                                         daemon=True)
    threads["finish"].start()
    assert f_paused.wait(30), "finish did not reach its switch"
    threads["run"] = threading.Thread(target=call, args=("run", lambda: run_upgrade(g)),
                                      daemon=True)
    threads["run"].start()
    deadline = time.time() + 30
    while time.time() < deadline and threads["run"].is_alive() and not r_publishing.is_set():
        time.sleep(0.02)
    f_go.set()
    threads["finish"].join(30)
    r_go.set()
    threads["run"].join(30)
    assert not any(t.is_alive() for t in threads.values())
    assert "finish" not in errors, errors
    if "run" in errors:  # refused: a clear error, not a crash
        assert isinstance(errors["run"], GalleriaError), errors
    with Gallery.open(g) as gal:
        assert gal.get_setting(STATE_KEY) is None  # no zombie job
        kn, vn = gal.load_vectors(gal.primary_space)
        idsn = list(gal.ids_of(kn))
        s = open_searcher(gal)
        paths = sorted(imgs.glob("*.png"))[:6]
        _, got, _ = s.search_paths(paths, 5)
        q = new_model.embed_images([Image.open(p).convert("RGB") for p in paths])
        order = np.argsort(-(q @ vn.T), axis=1, kind="stable")[:, :5]
        assert [list(r) for r in got.ids] == [[idsn[j] for j in row] for row in order]


def test_status_probes_never_make_a_writer_refused(tmp_path):
    """``upgrade status`` (and ``GET /v1/upgrade``) test the run lock by taking it for an
    instant; a run, train-transform or finish starting in that instant must not be
    refused as if another writer worked. A thread probes in a loop (bounded: 2 s)
    while the main thread takes and releases the lock 200 times: no refusal."""
    from galleria.upgrade.state import UpgradeError, lock_held, run_lock

    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", 4, 7)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2), online=OnlineConfig(enabled=False))
    stop = threading.Event()

    def probe():
        with Gallery.open(g, readonly=True) as gal:
            t_end = time.time() + 2
            while not stop.is_set() and time.time() < t_end:
                lock_held(gal)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    refused = 0
    with Gallery.open(g) as gal:
        for _ in range(200):
            try:
                with run_lock(gal):
                    pass
            except UpgradeError:
                refused += 1
    stop.set()
    t.join(5)
    assert refused == 0
