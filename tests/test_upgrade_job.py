"""The backfill job on small synthetic galleries (tiny deterministic extractors).

References: every item exactly once in exactly one space after any interruption;
search during the backfill equals the brute-force merge of the stored vectors;
after finish the gallery equals a fresh index built with the new model.
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
from PIL import Image

from galleria.errors import CompatibilityError, InputError
from galleria.extract.job import index_images
from galleria.extractors.base import Extractor
from galleria.extractors.pooling import Pooling
from galleria.extractors.preprocessing import Preprocessing
from galleria.images.sources import SourceItem
from galleria.store.gallery import Gallery
from galleria.upgrade import job as upjob
from galleria.upgrade.job import (
    UpgradeError,
    finish_upgrade,
    order_ids,
    run_upgrade,
    start_upgrade,
    upgrade_status,
)
from galleria.upgrade.merge import merged_scores
from galleria.upgrade.psi import ReverseTransform
from galleria.upgrade.search import BackfillSearcher, job_calibration

N = 40


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tiny(Extractor):
    """A deterministic random projection of an 8x8 thumbnail (a stand-in for a model)."""

    runtime = "numpy"

    def __init__(self, seed: int, dim: int = 12, delay: float = 0.0) -> None:
        super().__init__(name=f"tiny{seed}", dim=dim, preprocessing=Preprocessing(size=(8, 8)),
                         pooling=Pooling("mean"), weights_id=f"tiny-weights-{seed}",
                         source="test")
        self.proj = np.random.default_rng(seed).standard_normal((3 * 8 * 8, dim))
        self.delay = delay

    def _embed_scale(self, batch: np.ndarray, scale: float) -> np.ndarray:
        time.sleep(self.delay)  # a slow model, so a kill lands mid-run
        return (batch.reshape(len(batch), -1) @ self.proj).astype(np.float32)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    items = []
    for i in range(N):
        arr = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        p = root / f"im{i:03d}.png"
        Image.fromarray(arr).save(p)
        items.append(SourceItem(id=f"im{i:03d}.png", path=p))
    return items


@pytest.fixture()
def old_gallery(tmp_path, images):
    out = tmp_path / "g"
    index_images(images, out, extractor=Tiny(1))
    return out


def vectors_by_id(path, space):
    with Gallery.open(path) as g:
        keys, vecs = g.load_vectors(space)
        ids = g.ids_of(keys)
    return {i: v for i, v in zip(ids, vecs, strict=True)}


def check_exactly_once(path, state):
    with Gallery.open(path) as g:
        old, new = set(g.ids(state.old_space)), set(g.ids(state.new_space))
        assert not old & new, "an item is in both spaces"
        assert old | new == set(g.ids()), "an item is in neither space"
        assert len(g) == N


def test_start_errors(old_gallery):
    with pytest.raises(UpgradeError, match="already uses"):
        start_upgrade(old_gallery, "tiny1", extractor=Tiny(1))
    start_upgrade(old_gallery, "tiny2", extractor=Tiny(2))
    with pytest.raises(UpgradeError, match="already in progress"):
        start_upgrade(old_gallery, "tiny3", extractor=Tiny(3))
    with pytest.raises(UpgradeError, match=r"at 0\.0 %"):
        finish_upgrade(old_gallery)


def test_configs_and_keyword_options_are_the_same_job(old_gallery, tmp_path):
    from galleria.upgrade.config import RunConfig, StartConfig
    from galleria.upgrade.train import train_transform

    with pytest.raises(InputError, match="no option colour; known:"):
        start_upgrade(old_gallery, "tiny2", extractor=Tiny(2), colour="red")
    with pytest.raises(InputError, match="takes a StartConfig"):
        start_upgrade(old_gallery, "tiny2", RunConfig(), extractor=Tiny(2))
    # a config, and a keyword overriding one of its fields
    state = start_upgrade(old_gallery, "tiny2", StartConfig(order="id", seed=7, calib_size=3),
                          extractor=Tiny(2), calib_size=5)
    assert (state.order, state.seed, state.calib_size) == ("id", 7, 5)
    r = run_upgrade(old_gallery, RunConfig(limit=4, commit_every=2), extractor=Tiny(2),
                    batch_size=2)
    assert r.moved == 4
    with pytest.raises(InputError, match="no option limit"):
        train_transform(old_gallery, from_job=True, limit=3)


def test_interrupted_runs_move_every_item_exactly_once(old_gallery, monkeypatch):
    new = Tiny(2)
    state = start_upgrade(old_gallery, "tiny2", extractor=new, calib_size=10)
    r = run_upgrade(old_gallery, extractor=new, limit=7, commit_every=3, batch_size=2)
    assert r.moved == 7 and r.remaining == N - 7
    st = upgrade_status(old_gallery)
    assert (st.done, st.remaining, st.consistent) == (7, N - 7, True)
    assert st.fraction == pytest.approx(7 / N) and st.rate and st.eta_s is not None
    # a crash inside the third commit: the batch in flight is rolled back, nothing half-moved
    calls = {"n": 0}
    real_add = Gallery.add

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C in the middle of a commit looks like
        return real_add(self, *a, **kw)

    monkeypatch.setattr(Gallery, "add", flaky)
    r = run_upgrade(old_gallery, extractor=new, commit_every=4, batch_size=2)
    assert r.interrupted and r.moved == 8
    monkeypatch.setattr(Gallery, "add", real_add)
    check_exactly_once(old_gallery, state)
    assert upgrade_status(old_gallery).done == 15
    r = run_upgrade(old_gallery, extractor=new, commit_every=5)
    assert r.moved == N - 15 and r.remaining == 0
    check_exactly_once(old_gallery, state)
    assert upgrade_status(old_gallery).fraction == 1.0
    # the calibration pairs: the first 10 moved items, old and new vectors
    ids, o, n = upjob.load_pairs(old_gallery)
    assert len(ids) == 10 and o.shape == (10, 12) and n.shape == (10, 12)


def test_random_order_is_seeded_and_stable():
    ids = [f"x{i}" for i in range(100)]
    a = order_ids(ids, "random", seed=3)
    assert a == order_ids(list(reversed(ids)), "random", seed=3)
    assert a != order_ids(ids, "random", seed=4)
    # resuming with a subset keeps the same relative order
    assert order_ids(a[40:], "random", seed=3) == a[40:]
    assert order_ids(ids, "priority", priorities=list(range(100)))[0] == "x99"


def test_search_during_backfill_matches_brute_force(old_gallery):
    new = Tiny(2)
    state = start_upgrade(old_gallery, "tiny2", extractor=new, calib_size=1000)
    run_upgrade(old_gallery, extractor=new, limit=17)
    old_vecs = vectors_by_id(old_gallery, state.old_space)
    new_vecs = vectors_by_id(old_gallery, state.new_space)
    ids = sorted(old_vecs) + sorted(new_vecs)
    rng = np.random.default_rng(5)
    qo = rng.standard_normal((4, 12)).astype(np.float32)
    qn = rng.standard_normal((4, 12)).astype(np.float32)
    qo /= np.linalg.norm(qo, axis=1, keepdims=True)
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    go = np.stack([old_vecs.get(i, np.zeros(12, np.float32)) for i in ids])
    gn = np.stack([new_vecs.get(i, np.zeros(12, np.float32)) for i in ids])
    mask = np.array([i in new_vecs for i in ids])
    with Gallery.open(old_gallery) as g:
        for rule in ("naive", "rank-merge"):
            cal = job_calibration(g, "quantile" if rule == "rank-merge" else "identity")
            s = BackfillSearcher(g, rule=rule, calibration=cal)
            res = s.search_vectors(old_queries=qo, new_queries=qn, k=N)
            ref = merged_scores(qo @ go.T, qn @ gn.T, mask, cal)
            want = [[ids[j] for j in row] for row in np.argsort(-ref, axis=1, kind="stable")]
            assert res.ids.tolist() == want
            # every item is found exactly once with k = N
            assert all(sorted(r) == sorted(ids) for r in res.ids.tolist())
        # psi rule: one query embedding; a psi of other models is refused with both names
        _, po, pn = upjob.load_pairs(old_gallery)
        psi = ReverseTransform(hidden=0, epochs=3, batch_size=8).fit(
            pn, po, new_fingerprint=state.new_space, old_fingerprint=state.old_space)
        s = BackfillSearcher(g, rule="psi", psi=psi)
        res = s.search_vectors(new_queries=qn, k=5)
        ref = merged_scores(psi.transform(qn) @ go.T, qn @ gn.T, mask)
        want = [[ids[j] for j in row[:5]] for row in np.argsort(-ref, axis=1, kind="stable")]
        assert res.ids.tolist() == want
        assert s.cost.per_query()["index_searches_per_query"] == 2
        # fused: old(q) + w psi(new(q)) on the old part, with the job's cohort Z-norm
        from galleria.upgrade.search import fuse_queries

        norm = job_calibration(g, "znorm-top")
        s = BackfillSearcher(g, rule="fused", psi=psi, calibration=norm)
        res = s.search_vectors(old_queries=qo, new_queries=qn, k=N)
        qf = fuse_queries(qo, psi.transform(qn))
        ref = merged_scores(qf @ go.T, qn @ gn.T, mask, norm, old_queries=qf, new_queries=qn)
        want = [[ids[j] for j in row] for row in np.argsort(-ref, axis=1, kind="stable")]
        assert res.ids.tolist() == want
        other = ReverseTransform(hidden=0, epochs=1, batch_size=8).fit(
            pn, po, new_fingerprint=Tiny(7).fingerprint, old_fingerprint=state.old_space)
        with pytest.raises(CompatibilityError, match="tiny7"):
            BackfillSearcher(g, rule="psi", psi=other)
        # old-only in online mode: the old model alone on every item (moved items by the
        # old vectors the job kept in its pairs)
        pid, po_all, _ = upjob.load_pairs(old_gallery)
        every_old = {**old_vecs, **dict(zip(pid, po_all, strict=True))}
        assert len(every_old) == N
        keys = sorted(every_old)
        res = BackfillSearcher(g, rule="old-only").search_vectors(old_queries=qo, k=N)
        ref = qo @ np.stack([every_old[i] for i in keys]).T
        want = [[keys[j] for j in row] for row in np.argsort(-ref, axis=1, kind="stable")]
        assert res.ids.tolist() == want


def test_failures_are_kept_reported_and_finish_needs_force(old_gallery, images):
    new = Tiny(2)
    state = start_upgrade(old_gallery, "tiny2", extractor=new)
    images[5].path.unlink()
    images[9].path.write_bytes(b"not an image")
    r = run_upgrade(old_gallery, extractor=new)
    assert {f.id for f in r.failed} == {images[5].id, images[9].id} and r.remaining == 2
    st = upgrade_status(old_gallery)
    assert st.remaining == 2 and len(st.failed) == 2 and st.consistent
    with Gallery.open(old_gallery) as g:  # still searchable in the old space
        assert set(g.ids(state.old_space)) == {images[5].id, images[9].id}
    # a second run skips them (no retry loop) unless asked
    assert run_upgrade(old_gallery, extractor=new).todo_before == 0
    assert run_upgrade(old_gallery, extractor=new, retry_failed=True).todo_before == 2
    with pytest.raises(UpgradeError, match=r"could not be re-embedded.*--force"):
        finish_upgrade(old_gallery)
    rep = finish_upgrade(old_gallery, force=True)
    assert sorted(rep.dropped_failed) == sorted([images[5].id, images[9].id])
    with Gallery.open(old_gallery) as g:
        assert len(g) == N - 2 and [s.space for s in g.spaces()] == [state.new_space]


def test_finish_equals_a_fresh_index_of_the_new_model(old_gallery, images, tmp_path):
    new = Tiny(2)
    state = start_upgrade(old_gallery, "tiny2", extractor=new, order="id")
    run_upgrade(old_gallery, extractor=new, limit=N - 1)
    with pytest.raises(UpgradeError, match="1 of 40 items are still in the old space"):
        finish_upgrade(old_gallery)
    run_upgrade(old_gallery, extractor=new)
    finish_upgrade(old_gallery)
    fresh = tmp_path / "fresh"
    index_images(images, fresh, extractor=Tiny(2))
    a = vectors_by_id(old_gallery, state.new_space)
    b = vectors_by_id(fresh, state.new_space)
    assert sorted(a) == sorted(b)
    for i in a:
        np.testing.assert_allclose(a[i], b[i], atol=1e-6)
    q = np.stack([b[images[3].id], b[images[17].id]])
    with Gallery.open(old_gallery) as g1, Gallery.open(fresh) as g2:
        assert [s.space for s in g1.spaces()] == [s.space for s in g2.spaces()]
        assert g1.primary_space == g2.primary_space == state.new_space
        assert g1.get_setting("upgrade") is None and not (old_gallery / "upgrade").exists()
        assert g1.meta(g1.ids()) == g2.meta(g1.ids())
        r1 = g1.search(q, 10, space=state.new_space)
        r2 = g2.search(q, 10, space=state.new_space)
        assert r1.ids.tolist() == r2.ids.tolist()
        np.testing.assert_allclose(r1.scores, r2.scores, atol=1e-6)
    with pytest.raises(UpgradeError, match="no upgrade in progress"):
        upgrade_status(old_gallery)


def test_shadow_mode_keeps_old_vectors_until_finish(old_gallery):
    new = Tiny(2)
    state = start_upgrade(old_gallery, "tiny2", extractor=new, mode="shadow")
    run_upgrade(old_gallery, extractor=new, limit=10)
    with Gallery.open(old_gallery) as g:
        assert g.count(state.old_space) == N and g.count(state.new_space) == 10
        s = BackfillSearcher(g, rule="auto")
        assert s.rule == "old-only"
        q = g.get_vectors(g.keys_of(["im000.png"]), space=state.old_space)
        assert s.search_vectors(old_queries=q, k=1).ids[0, 0] == "im000.png"
        with pytest.raises(UpgradeError, match="shadow"):
            BackfillSearcher(g, rule="naive")
    st = upgrade_status(old_gallery)
    assert st.done == 10 and st.consistent and st.in_both == 10
    run_upgrade(old_gallery, extractor=new)
    finish_upgrade(old_gallery)
    with Gallery.open(old_gallery) as g:
        assert [s.space for s in g.spaces()] == [state.new_space] and g.count() == N


def test_train_transform_from_job_pairs_attaches_psi(old_gallery):
    from galleria.upgrade.search import resolve_rule
    from galleria.upgrade.train import train_transform

    new = Tiny(2)
    start_upgrade(old_gallery, "tiny2", extractor=new, calib_size=30)
    with pytest.raises(InputError, match="collected only 0 pairs"):
        train_transform(old_gallery, from_job=True)
    run_upgrade(old_gallery, extractor=new, limit=30)
    with pytest.raises(InputError, match="carry no labels"):
        train_transform(old_gallery, kind="metric-compatible", from_job=True,
                        label_column="label")
    folder, psi = train_transform(old_gallery, from_job=True,
                                  params={"hidden": 0, "epochs": 3, "batch_size": 8})
    assert folder == old_gallery / "upgrade" / "transforms" / "regression"
    with Gallery.open(old_gallery) as g:
        state = upjob.require_upgrade(g)
        assert state.transforms == {"regression": "upgrade/transforms/regression"}
        # attached, but `auto` switches to psi only after the pseudo-query check: the
        # tiny models record no config, so there are no query models to check it with
        assert state.online["decision"]["checked"] is False
        assert state.online["decision"]["source"] == "train-transform"
        assert resolve_rule("auto", g, state) == "rank-merge"
        # 30 pairs < MIN_PAIRS: the calibration stored with psi (its held-out pairs) is used
        cal = job_calibration(g, "quantile", psi=psi)
        assert cal.info["source"] == "psi artifact" and cal.old.kind == "quantile"
    assert upgrade_status(old_gallery).to_dict()["transforms"] == {
        "regression": "upgrade/transforms/regression"}


def test_sigkill_in_the_middle_of_a_run(old_gallery):
    """A real kill -9 of a process running the job: exactly once, then resume finishes it."""
    state = start_upgrade(old_gallery, "tiny2", extractor=Tiny(2))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from test_upgrade_job import Tiny\n"
        "from galleria.upgrade.job import run_upgrade\n"
        "run_upgrade(sys.argv[2], extractor=Tiny(2, delay=0.05), batch_size=2,"
        " commit_every=2, workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent),
                             str(old_gallery)])
    deadline = time.time() + 60
    moved = 0
    while time.time() < deadline and proc.poll() is None:
        with Gallery.open(old_gallery, readonly=True) as g:
            moved = g.count(state.new_space)
        if moved >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    check_exactly_once(old_gallery, state)
    st = upgrade_status(old_gallery)
    assert 6 <= st.done < N and st.consistent
    r = run_upgrade(old_gallery, extractor=Tiny(2))
    assert r.moved == N - st.done and r.remaining == 0
    check_exactly_once(old_gallery, state)


def test_items_indexed_with_the_new_model_meanwhile_are_adopted(old_gallery, images):
    new = Tiny(2)
    state = start_upgrade(old_gallery, "tiny2", extractor=new)
    index_images(images[:5], old_gallery, extractor=Tiny(2))  # someone re-indexes 5 items
    st = upgrade_status(old_gallery)
    assert st.in_both == 5 and not st.consistent and st.done == 5
    r = run_upgrade(old_gallery, extractor=new)
    assert r.adopted == 5 and r.moved == N - 5
    check_exactly_once(old_gallery, state)


def test_train_transform_from_labelled_images(old_gallery, images, monkeypatch, tmp_path):
    from galleria.upgrade import train as uptrain
    from galleria.upgrade.psi import load_cross_map

    state = start_upgrade(old_gallery, "tiny2", extractor=Tiny(2))
    models = {Tiny(1).fingerprint: Tiny(1), Tiny(2).fingerprint: Tiny(2)}
    monkeypatch.setattr(uptrain, "extractor_from_space",
                        lambda info, **kw: models[info["fingerprint"]])
    monkeypatch.setenv("GALLERIA_CACHE", str(tmp_path / "cache"))
    csv = tmp_path / "train.csv"
    rows = [f"{it.path},c{i % 4},{'train' if i < 32 else 'test'}" for i, it in
            enumerate(images)]
    csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(InputError, match="needs labels"):
        uptrain.train_transform(old_gallery, kind="bct", images=csv)
    small = {"hidden": 0, "epochs": 2, "batch_size": 8}
    for kind in ("metric-compatible", "bct"):
        folder, m = uptrain.train_transform(
            old_gallery, kind=kind, images=csv, label_column="label", split_column="split",
            split="train", params=small)
        assert m.info_["n_pairs"] == 32
        back = load_cross_map(folder, old_fingerprint=state.old_space,
                              new_fingerprint=state.new_space)
        assert back.fingerprint == m.fingerprint
    with Gallery.open(old_gallery) as g:
        assert set(upjob.require_upgrade(g).transforms) == {"metric-compatible", "bct"}
