"""A fused gallery growing after its adaptation (``galleria.fusion.grow``), on real images
(COIL-20) with a small real fusion model: added items get their adapted vectors at once (the
gallery-whitened ones by one matrix product of their fused vectors, equal to what a refit-free
application of the stored fit gives), the refit triggers at the growth threshold, and searches
running while items are added and a refit runs never see a half-written state."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _fusionmodel import small_fusion_model
from _fusionmodel import write_manifest as _manifest
from galleria.cli.main import main
from galleria.extract.job import index_images
from galleria.fusion.adapt import AdaptConfig, normalize
from galleria.fusion.adapt_job import adapt_gallery, fusion_state
from galleria.fusion.adaptation import QueryAdaptation
from galleria.fusion.extractor import gallery_extractor
from galleria.fusion.grow import growth
from galleria.images.sources import list_source
from galleria.store.gallery import Gallery

pytestmark = pytest.mark.shared
#: the gallery-whitened answer forced (the path with derived vectors), growth 25 %
CFG = AdaptConfig(min_items=20, pseudo_items=20, views=1, in_domain=0.0, homogeneous=0.0,
                  refit_growth=1.25)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return small_fusion_model(tmp_path_factory.mktemp("fusion-grow") / "F")


@pytest.fixture(scope="module")
def rows(require_shared) -> tuple[Path, list[dict[str, str]]]:
    root = require_shared("coil20")
    with open(root / "manifest.csv", newline="") as fh:
        got = list(csv.DictReader(fh))
    by: dict[str, list[dict[str, str]]] = {}
    for r in got:
        by.setdefault(r["object"], []).append(r)
    return root, [r for o in sorted(by)[:8] for r in by[o][:5]]  # 40, fixed order


def _adapted(model_dir: Path, root: Path, rows: list[dict[str, str]], g_dir: Path,
             tmp: Path) -> dict:
    man = _manifest(root, rows, tmp / "first.csv")
    index_images(list_source(man), g_dir, extractor=gallery_extractor(model_dir, g_dir,
                                                                      threads=1),
                 explicit_ids=True)
    rep = adapt_gallery(g_dir, config=CFG, threads=1, workers=1)
    assert rep["answer"] == "whitened", rep
    with Gallery.open(g_dir, readonly=True) as g:
        return fusion_state(g)


def _whitened_ok(g_dir: Path, st: dict) -> list[str]:
    """The whitened space holds every fused item, each ``normalize(fused @ P + c)`` of the
    stored fit; its ids."""
    t = QueryAdaptation.load(g_dir / st["whitening"]["path"])
    with Gallery.open(g_dir, readonly=True) as g:
        sp, fused = st["whitening"]["space"], st["fused_space"]
        ids = g.ids(fused)
        assert sorted(g.ids(sp)) == sorted(ids)
        keys = g.keys_of(ids)
        got = g.get_vectors(keys, space=sp)
        want = normalize(t.apply(np.asarray(g.get_vectors(keys, space=fused), np.float64)))
    np.testing.assert_allclose(got, want, atol=1e-6)
    return ids


@pytest.mark.slow  # ~40 s at load 2 (2 cores): two index runs, two fits, one CLI run
def test_added_items_are_in_the_adapted_space_at_once_and_the_refit_triggers_at_25_percent(
        model_dir, rows, tmp_path, capsys):
    root, rs = rows
    g_dir = tmp_path / "G"
    st = _adapted(model_dir, root, rs[:24], g_dir, tmp_path)
    assert st["n_items"] == 24 and st["refit_at"] == 30
    # 4 more through the Python API, no --fusion and no adaptation call: at once
    rep = index_images(list_source(_manifest(root, rs[:28], tmp_path / "b.csv")), g_dir,
                       explicit_ids=True, threads=1)
    assert rep.embedded == 4 and st["whitening"]["space"] not in rep.spaces  # no 2nd members pass
    ids = _whitened_ok(g_dir, st)
    assert len(ids) == 28
    with Gallery.open(g_dir, readonly=True) as g:
        assert g.count(st["light_space"]) == 28 and fusion_state(g) == st  # no refit yet
        assert growth(g) == {"fitted_on": 24, "items": 28, "refit_at": 30, "growth": 1.167,
                             "due": False}
    # searchable in the adapted space: a searcher opened now answers a query image (light
    # pass + the stored map) exactly as brute force over the space, added items included
    from galleria.decision.open import open_searcher

    s = open_searcher(g_dir, threads=1)
    try:
        assert s.describe()["model"] == st["whitening"]["space"]
        _, res, fails = s.search_paths([str(root / rs[26]["path"])], 5)
        q = s.embed_paths([str(root / rs[26]["path"])])[0]
    finally:
        s.close()
    assert not fails
    with Gallery.open(g_dir, readonly=True) as g:
        gv = g.get_vectors(g.keys_of(ids), space=st["whitening"]["space"])
    qv = np.asarray(q[st["whitening"]["space"]])[0]
    order = np.argsort(-(gv @ qv), kind="stable")[:5]
    assert [i for i, _ in res.row(0)] == [ids[j] for j in order]
    # and an added item's own whitened vector finds it first (the untrained test model's light
    # query need not)
    j = ids.index(rs[26]["path"])
    s = open_searcher(g_dir, threads=1, with_models=False)
    try:
        assert s.search(gv[j:j + 1], 1).row(0)[0][0] == rs[26]["path"]
    finally:
        s.close()
    # 2 more with the CLI (plain `galleria index`): 30 = 24 x 1.25, the run refits
    man = _manifest(root, rs[:30], tmp_path / "c.csv")
    assert main(["index", str(man), "--out", str(g_dir), "-q", "--json", "--threads", "1"]) == 0
    fu = json.loads(capsys.readouterr().out)["fusion"]
    assert "grew from 24 to 30" in fu["fit"], fu["fit"]
    with Gallery.open(g_dir, readonly=True) as g:
        new = fusion_state(g)
        assert new["n_items"] == 30 and new["refit_at"] == 38
        assert g.primary_space == new["space"] == new["whitening"]["space"]
        if new["whitening"]["space"] != st["whitening"]["space"]:  # the old one: not filled
            assert g.space_info(st["whitening"]["space"]).info.get("retired") is True
    assert len(_whitened_ok(g_dir, new)) == 30
    assert main(["info", str(g_dir)]) == 0
    assert "fusion fit: fitted on 30 items, the fused space holds 30 (x1.0); refit at 38" in \
        capsys.readouterr().out


@pytest.mark.slow  # ~60 s at load 2: adds, refits and searches in three threads, bounded
def test_searches_while_items_are_added_and_a_refit_runs(model_dir, rows, tmp_path):
    from galleria.decision.open import open_searcher

    root, rs = rows
    g_dir = tmp_path / "G"
    _adapted(model_dir, root, rs[:24], g_dir, tmp_path)
    errors: list[BaseException] = []
    stop = threading.Event()
    seen: list[tuple[str, int]] = []

    def guard(fn):  # a test thread body: errors go to the main thread
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                import traceback

                errors.append(exc)
                traceback.print_exc()
        return run

    def add() -> None:
        for n in (28, 32, 36, 40):  # 4 items at a time, one commit each
            index_images(list_source(_manifest(root, rs[:n], tmp_path / f"m{n}.csv")), g_dir,
                         explicit_ids=True, threads=1, flush_every=4)

    def refit() -> None:
        for _ in range(2):
            adapt_gallery(g_dir, refit=True, threads=1, workers=1)

    def search() -> None:
        rng = np.random.default_rng(0)
        with Gallery.open(g_dir, readonly=True) as g:
            while not stop.is_set():
                space = g.primary_space
                ids = g.ids(space)  # read before the searcher opens: all in its snapshot
                s = open_searcher(g_dir, threads=1, with_models=False)
                try:
                    if s.spaces[0] != space:  # a refit switched the space in between
                        continue
                    j = int(rng.integers(len(ids)))
                    v = g.get_vectors(g.keys_of([ids[j]]), space=space)
                    top = s.search(v, 3).row(0)[0]
                    # a complete space: the item's own vector finds the item (score 1)
                    assert top[0] == ids[j] or abs(top[1] - 1.0) < 1e-4, (top, ids[j])
                    seen.append((space, len(ids)))
                finally:
                    s.close()

    threads = [threading.Thread(target=guard(f)) for f in (add, refit)]
    searcher = threading.Thread(target=guard(search))
    searcher.start()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 240
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    stop.set()
    searcher.join(30)
    assert not any(t.is_alive() for t in [*threads, searcher]), "bounded: a thread hung"
    assert not errors, errors
    assert len(seen) >= 3
    # the end state: the last fit is complete, every item in its whitened space, and a
    # refit now (what the next index run would do when due) finds it current or refits
    with Gallery.open(g_dir, readonly=True) as g:
        st = fusion_state(g)
        assert g.count(st["fused_space"]) == 40 and g.primary_space == st["space"]
    assert len(_whitened_ok(g_dir, st)) == 40


@pytest.mark.slow  # ~60 s at load 5: a server, 6 uploads, a background refit, searches
def test_service_uploads_are_whitened_at_once_and_refit_in_the_background(model_dir, rows,
                                                                         tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from _service import ProcessServer

    root, rs = rows
    g_dir = tmp_path / "G"
    st = _adapted(model_dir, root, rs[:24], g_dir, tmp_path)
    (tmp_path / "token").write_text("t" * 24 + "\n")
    auth = {"Authorization": "Bearer " + "t" * 24}
    with ProcessServer(g_dir, "--token-file", str(tmp_path / "token"), "--threads", "1",
                       log=tmp_path / "server.log") as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        for n, r in enumerate(rs[24:30], 25):
            data = (root / r["path"]).read_bytes()
            got = c.post("/v1/items", files={"image": ("x.png", data, "image/png")},
                         data={"id": f"up/{n}"}, headers=auth)
            assert got.status_code == 201, got.text
            assert st["whitening"]["space"] not in got.json()["spaces"]  # no members pass
            with Gallery.open(g_dir, readonly=True) as g:  # in the answering space at once
                assert g.has([f"up/{n}"], st["whitening"]["space"])[0] or \
                    fusion_state(g)["n_items"] == 30  # (a refit may have replaced the space)
            s = c.post("/v1/search", files={"image": ("q.png", data, "image/png")},
                       data={"k": 3})
            assert s.status_code == 200, s.text
        deadline = time.monotonic() + 180  # the 6th upload crossed 24 x 1.25 = 30
        while time.monotonic() < deadline:
            with Gallery.open(g_dir, readonly=True) as g:
                if fusion_state(g)["n_items"] == 30:
                    break
            assert c.post("/v1/search", files={"image": ("q.png", data, "image/png")},
                          data={"k": 3}).status_code == 200
            time.sleep(0.5)
    with Gallery.open(g_dir, readonly=True) as g:
        new = fusion_state(g)
    assert new["n_items"] == 30 and new["refit_at"] == 38, new.get("n_items")
    assert len(_whitened_ok(g_dir, new)) == 30
