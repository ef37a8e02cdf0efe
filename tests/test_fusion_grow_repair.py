"""A fused gallery killed between an add's two commits (the fused vector, then its
gallery-whitened one, :mod:`galleria.extract.derived`): the item is never answered with the
whitened vector of its previous image, and the next service start or index run fills what is
missing; ``galleria index`` refits only a gallery that has a fit (not after ``--reset``)."""

from __future__ import annotations

import json

import pytest

import test_fusion_grow as fg
from _fusionmodel import small_fusion_model
from galleria.cli.main import main
from galleria.extract import job
from galleria.extract.job import index_images
from galleria.fusion.adapt_job import fusion_state
from galleria.images.sources import list_source
from galleria.store.gallery import Gallery
from test_fusion_grow import _adapted, _manifest, _whitened_ok

pytestmark = pytest.mark.shared
rows = fg.rows  # the 40 COIL-20 images (fixture)


class _Killed(Exception):
    pass


def _crash(*_a, **_k):  # the process dies after the fused commit, before the derived fill
    raise _Killed


@pytest.mark.slow  # ~40 s at load 2: two index runs, a fit, two crashed runs, one start
def test_a_kill_between_the_fused_and_the_whitened_commit_leaves_nothing_stale(
        rows, tmp_path, monkeypatch, tmp_path_factory):
    from galleria.service.engine import Engine, ServiceConfig

    model_dir = small_fusion_model(tmp_path_factory.mktemp("fusion-repair") / "F")
    root, rs = rows
    g_dir = tmp_path / "G"
    st = _adapted(model_dir, root, rs[:24], g_dir, tmp_path)
    wsp, fsp = st["whitening"]["space"], st["fused_space"]
    with Gallery.open(g_dir, readonly=True) as g:
        old = g.get_vectors(g.keys_of([rs[0]["path"]]), space=wsp)[0]
    # re-index item 0 with another image (same id) and add 2 new items; killed after the
    # fused commit
    man = _manifest(root, rs[:26], tmp_path / "changed.csv")
    man.write_text(man.read_text().replace(f",{root / rs[0]['path']}",
                                           f",{root / rs[30]['path']}", 1))
    monkeypatch.setattr(job, "derive_into", _crash)
    with pytest.raises(_Killed):
        index_images(list_source(man), g_dir, explicit_ids=True, threads=1, update=True,
                     flush_every=64)
    monkeypatch.undo()
    with Gallery.open(g_dir, readonly=True) as g:
        assert g.count(fsp) == 26
        # the changed and the new items: in the fused space, not (yet) in the whitened one
        assert g.has([rs[0]["path"], rs[24]["path"], rs[25]["path"]], fsp).all()
        assert not g.has([rs[0]["path"], rs[24]["path"], rs[25]["path"]], wsp).any()
        assert g.count(wsp) == 23
    # the service start fills them from the stored fused vectors
    eng = Engine(ServiceConfig(gallery=g_dir, threads=1))
    eng.start()
    try:
        assert eng.ready.wait(120), eng.startup_error
    finally:
        eng.stop()
    ids = _whitened_ok(g_dir, st)
    assert len(ids) == 26
    with Gallery.open(g_dir, readonly=True) as g:
        new = g.get_vectors(g.keys_of([rs[0]["path"]]), space=wsp)[0]
    assert float(new @ old) < 1 - 1e-4  # the new image's whitened vector, not the old one
    # killed again on 2 more items (and item 0, back to its first image); the next index run
    # (nothing to embed) fills them first
    monkeypatch.setattr(job, "derive_into", _crash)
    with pytest.raises(_Killed):
        index_images(list_source(_manifest(root, rs[:28], tmp_path / "b.csv")), g_dir,
                     explicit_ids=True, threads=1)
    monkeypatch.undo()
    with Gallery.open(g_dir, readonly=True) as g:
        assert g.count(wsp) == 25 and g.count(fsp) == 28
    rep = index_images(list_source(_manifest(root, rs[:28], tmp_path / "b.csv")), g_dir,
                       explicit_ids=True, threads=1)
    assert fsp not in rep.embedded_per_space  # (the light pass the crash cut: done now)
    assert len(_whitened_ok(g_dir, st)) == 28
    with Gallery.open(g_dir, readonly=True) as g:
        assert fusion_state(g) == st  # no refit: 28 < 30


@pytest.mark.slow  # ~30 s at load 2: an index run, a fit, a reset, two CLI index runs
def test_index_does_not_re_adapt_a_gallery_after_reset(rows, tmp_path, tmp_path_factory, capsys):
    model_dir = small_fusion_model(tmp_path_factory.mktemp("fusion-reset") / "F")
    root, rs = rows
    g_dir = tmp_path / "G"
    st = _adapted(model_dir, root, rs[:24], g_dir, tmp_path)
    assert main(["fusion", "adapt", str(g_dir), "--reset"]) == 0
    capsys.readouterr()
    man = _manifest(root, rs[:30], tmp_path / "c.csv")  # 30 = 24 x 1.25: was a refit
    assert main(["index", str(man), "--out", str(g_dir), "-q", "--json", "--threads", "1"]) == 0
    assert "fusion" not in json.loads(capsys.readouterr().out)
    with Gallery.open(g_dir, readonly=True) as g:
        assert g.get_setting("fusion") is None  # still reset: the trained query answers
        assert g.primary_space == st["fused_space"] and g.count(st["fused_space"]) == 30
    # an explicit --fusion run adapts again, as before (the default config: a fit record)
    assert main(["index", str(man), "--out", str(g_dir), "-q", "--json", "--threads", "1",
                 "--fusion", str(model_dir)]) == 0
    assert "fusion" in json.loads(capsys.readouterr().out)
    with Gallery.open(g_dir, readonly=True) as g:
        assert g.get_setting("fusion")["refit_at"]
