"""``upgrade train-transform`` and ``upgrade run`` never write the job record at once.

Both write the gallery's job record: train-transform attaches its map and publishes
its checked decision, a run publishes its online checks. Read-modify-write by both
at once loses one of the writes. The test makes the overlap certain: a run (thread
``run``) is held inside its publication, between reading the record and writing it,
while train-transform (thread ``train``) runs; the run then writes. Whatever
train-transform did must survive: refused (the run holds the job's lock), or its map
still attached when both are done. Before the lock it was silently lost. Seeded,
tiny numpy models, bounded waits.
"""

from __future__ import annotations

import threading

import pytest

import _tiny
import galleria.upgrade.online as online
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.job import run_upgrade, start_upgrade
from galleria.upgrade.online import OnlineConfig
from galleria.upgrade.state import UpgradeError, lock_held, require_upgrade
from galleria.upgrade.train import job_writer, train_transform

N = 40
WAIT_S = 20.0
PARAMS = {"hidden": 0, "epochs": 2, "batch_size": 8}


@pytest.fixture()
def gallery(tmp_path):
    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", N, 5)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2, dim=10), order="random",
                  calib_size=16, online=OnlineConfig(first_at=16, pseudo_queries=12, seed=0,
                                                     recheck_every=0.1))
    run_upgrade(g, limit=16, commit_every=8)  # pairs for --from-job
    return g


def test_train_transform_while_a_run_publishes_loses_no_write(gallery, monkeypatch):
    real_save = online.save_state
    in_publish, train_done = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def held_save(g, state):  # the run: record read, its write held until train is done
        if threading.current_thread().name == "run" and not in_publish.is_set():
            in_publish.set()
            train_done.wait(WAIT_S)
        return real_save(g, state)

    monkeypatch.setattr(online, "save_state", held_save)

    def run() -> None:
        try:
            outcome["run"] = run_upgrade(gallery, limit=8, commit_every=8)
        except BaseException as exc:  # reported by the main thread
            outcome["run"] = exc

    def train() -> None:
        try:
            if not in_publish.wait(WAIT_S):
                outcome["train"] = TimeoutError("the run never published")
                return
            outcome["lock_held"] = lock_held_now()
            outcome["train"] = train_transform(gallery, from_job=True, params=PARAMS)
        except BaseException as exc:
            outcome["train"] = exc
        finally:
            train_done.set()

    def lock_held_now() -> bool:
        with Gallery.open(gallery) as g:
            return lock_held(g)

    threads = [threading.Thread(target=run, name="run"),
               threading.Thread(target=train, name="train")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"
    assert not isinstance(outcome["run"], BaseException), outcome["run"]
    assert outcome["lock_held"] is True  # the two overlapped: the run was publishing
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        assert d["source"] in ("online", "recheck") and d["moved"] == 24  # the run's write
        trained = outcome["train"]
        if isinstance(trained, BaseException):  # refused: nothing of it half-written
            assert isinstance(trained, UpgradeError), trained
            assert "galleria upgrade run" in str(trained)
            assert "regression" not in st.transforms
        else:  # it ran: its map must still be attached after the run's write
            assert st.transforms.get("regression") == "upgrade/transforms/regression"
    # after the run, train-transform goes through and publishes its decision
    train_transform(gallery, from_job=True, params=PARAMS)
    with Gallery.open(gallery) as g:
        st = require_upgrade(g)
        assert st.transforms["regression"] == "upgrade/transforms/regression"
        assert st.online["decision"]["source"] == "train-transform"
        assert not lock_held(g)
    # and a run is refused while train-transform holds the lock, naming it
    with Gallery.open(gallery) as g, job_writer(g), \
            pytest.raises(UpgradeError, match="galleria upgrade train-transform"):
        run_upgrade(gallery, limit=1)
