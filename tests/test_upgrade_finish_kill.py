"""kill -9 at every point of `upgrade finish`: search answers at each, the next finish completes.

A point is any commit, file replacement or deletion `finish_upgrade` makes (counted
by a driver that wraps those calls). For each point a copy of a gallery at 100 %
of its backfill is finished in a subprocess that SIGKILLs itself just before that
point; then search must return the brute-force top-k of the new model once the
switch is committed, and before it the job's answers (at 100 % too, the answers its
last check chose: the old model's here), and a second `finish` must leave a gallery
equal to a fresh index of the new model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _tiny
from galleria.decision import open_searcher
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.finish import finish_upgrade
from galleria.upgrade.job import run_upgrade, start_upgrade

HERE = Path(__file__).parent

DRIVER = r"""
import contextlib, os, shutil, signal, sys
sys.path[:0] = [sys.argv[3]]
import _tiny  # registers the tiny extractors
import galleria.store.db as dbm
from galleria.upgrade.finish import finish_upgrade

kill_at, n = int(sys.argv[2]), [0]

def tick():
    n[0] += 1
    if n[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

orig_write = dbm.Database.write

@contextlib.contextmanager
def write(self):
    tick()
    with orig_write(self) as c:
        yield c
    tick()

def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        tick()
        return f(*a, **k)
    setattr(mod, name, g)

dbm.Database.write = write
for mod, name in ((os, "replace"), (os, "unlink"), (os, "rename"), (shutil, "rmtree")):
    wrap(mod, name)
finish_upgrade(sys.argv[1])
print(n[0])
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE)])
    return env


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A gallery of 30 images whose upgrade tiny1 -> tiny2 is at 100 %, a fresh tiny2 and a
    fresh tiny1 (the old model's answers)."""
    root = tmp_path_factory.mktemp("finish")
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(11)
    for n in range(30):
        Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(
            imgs / f"{n:02d}.png")
    g = root / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2))
    run_upgrade(g, commit_every=7)
    with Gallery.open(g) as gal:  # at 100 % auto serves this until the switch
        rule = gal.get_setting("upgrade")["online"]["decision"]["rule"]
    assert rule == "old-only"
    fresh = root / "fresh"
    index_images(imgs, fresh, extractor=_tiny.tiny(2))
    fresh_old = root / "fresh-old"
    index_images(imgs, fresh_old, extractor=_tiny.tiny(1))
    return g, fresh, sorted(imgs.glob("*.png"))[:4], fresh_old


def _brute_ids(fresh: Path, queries: np.ndarray, k: int) -> list[list[str]]:
    with Gallery.open(fresh) as g:
        keys, x = g.load_vectors(g.primary_space)
        ids = g.ids_of(keys)
    order = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]
    return [[str(ids[j]) for j in row] for row in order]


def _events(template, tmp_path) -> int:
    g = tmp_path / "count"
    shutil.copytree(template[0], g)
    out = subprocess.run([sys.executable, "-c", DRIVER, str(g), "-1", str(HERE)], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_kill_at_every_point_of_finish(template, tmp_path):
    src, fresh, qpaths, fresh_old = template
    total = _events(template, tmp_path)
    assert total >= 10, f"finish makes only {total} commits/file operations"
    stride = int(os.environ.get("GALLERIA_FINISH_STRIDE", "1"))
    qext = _tiny.tiny(2)
    q = qext.embed_images([Image.open(p).convert("RGB") for p in qpaths])
    want = _brute_ids(fresh, q, 10)
    q_old = _tiny.tiny(1).embed_images([Image.open(p).convert("RGB") for p in qpaths])
    want_old = _brute_ids(fresh_old, q_old, 10)
    tried = 0
    for point in range(1, total + 1, stride):
        g = tmp_path / f"k{point}"
        shutil.copytree(src, g)
        run = subprocess.run([sys.executable, "-c", DRIVER, str(g), str(point), str(HERE)],
                             env=_env(), capture_output=True, text=True, timeout=120)
        assert run.returncode == -signal.SIGKILL, (point, run.returncode, run.stderr[-2000:])
        # search answers: the job's answers until the switch is committed (the old
        # model's, as its check chose), then the new model's complete ranking
        with Gallery.open(g) as a:
            switched = a.get_setting("upgrade") is None
        s = open_searcher(g)
        qs, good, fails = s.embed_paths(qpaths)
        assert not fails and len(good) == len(qpaths)
        res = s.search(qs, 10)
        assert res.ids.tolist() == (want if switched else want_old), (point, type(s).__name__)
        s.gallery.close()
        # the next finish completes (unless the kill came after the last commit)
        with Gallery.open(g) as a:
            pending = a.get_setting("upgrade") or a.get_setting("upgrade:finishing")
        rep = finish_upgrade(g) if pending else None
        with Gallery.open(g) as a, Gallery.open(fresh) as b:
            assert [x.space for x in a.spaces()] == [x.space for x in b.spaces()], point
            assert a.primary_space == b.primary_space
            assert a.get_setting("upgrade") is None
            assert a.get_setting("upgrade:finishing") is None
            assert not (g / "upgrade").exists()
            assert a.check().ok, a.check().to_dict()
            assert sorted(a.ids()) == sorted(b.ids())
            ra = a.search(q, 10, space=a.primary_space)
            assert ra.ids.tolist() == want
            assert rep is None or rep.new_space == b.primary_space
        tried += 1
        shutil.rmtree(g)
    assert tried >= min(10, total)
