"""The old-answers guard of an online job holds up to ``finish``, 100 % included.

A job whose pseudo-query check finds the new model worse than the old one serves
the old model's answers at every fraction; when the last item moves the run
checks again (the decision at 100 % is about the gallery at 100 %), and the
unfinished job at 100 % still answers exactly as the old model: the top-k ids of
the default searcher (the one the service opens) equal a brute-force search of
the old vectors. After ``finish`` the same entry answers as the new model (a
brute-force search of the new vectors). Seeded; tiny numpy models.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

import _tiny
from galleria.decision.open import open_searcher
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.job import finish_upgrade, run_upgrade, start_upgrade
from galleria.upgrade.online import OnlineConfig, publish
from galleria.upgrade.search import resolve_rule
from galleria.upgrade.state import require_upgrade

N = 48
K = 10


def _exact(q: np.ndarray, ids: list[str], vecs: np.ndarray, k: int) -> list[list[str]]:
    order = np.argsort(-(q @ vecs.T), axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]


def test_an_unfinished_job_at_100_percent_keeps_the_old_answers_the_check_chose(tmp_path):
    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", N, 7)
    g = tmp_path / "g"
    old_model, new_model = _tiny.tiny(1), _tiny.tiny(2, dim=2)  # 2-d: far worse than 12-d
    index_images(imgs, g, extractor=old_model)
    with Gallery.open(g) as gal:
        k0, v0 = gal.load_vectors(gal.primary_space)
        ids0 = list(gal.ids_of(k0))
    paths = sorted(imgs.glob("*.png"))[:12]
    pics = [Image.open(p).convert("RGB") for p in paths]
    q_old, q_new = old_model.embed_images(pics), new_model.embed_images(pics)
    start_upgrade(g, "tiny-test", extractor=new_model, order="random", calib_size=20,
                  online=OnlineConfig(first_at=16, growth=4.0, pseudo_queries=24, seed=0,
                                      recheck_every=0.5))
    # by the schedule the last check before 100 % is a fit at 32 moved: the next fit is
    # due at 4x its pairs, a recheck after 24 more moved; only the last move checks at 48
    run_upgrade(g, commit_every=8)
    with Gallery.open(g) as gal:
        st = require_upgrade(gal)
        assert gal.count(st.old_space) == 0 and gal.count(st.new_space) == N  # 100 %
        d = st.online["decision"]
        # the last check is about the gallery at 100 % (it ran when the last item moved)
        assert d["checked"] and d["moved"] == N
        assert d["rule"] == "old-only" and d["verdict"]["merged_vs_old"] != "better"
        assert resolve_rule("auto", gal, st) == "old-only"
        s = open_searcher(gal)  # what the service and the CLI open: the job's searcher
        assert s.describe()["merge"]["rule"] == "old-only"
        _, got, _ = s.search_paths(paths, K)
        assert got is not None
        assert [list(r) for r in got.ids] == _exact(q_old, ids0, v0, K)
        # by vectors too, a query the gallery does not contain
        q = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        got = s.search_vectors(old_queries=q, k=K)
        assert [list(r) for r in got.ids] == _exact(q, ids0, v0, K)
    # a run killed between its last commit and that check: the next run, with nothing
    # left to move, makes it (the published decision is the one before the last move)
    with Gallery.open(g) as gal:
        publish(gal, {**d, "moved": 40, "checks": d["checks"] - 1})
    run_upgrade(g)
    with Gallery.open(g) as gal:
        d2 = require_upgrade(gal).online["decision"]
        assert d2["moved"] == N and d2["checks"] == d["checks"] and d2["rule"] == "old-only"
    run_upgrade(g)  # and only then: a run with nothing new checks nothing
    with Gallery.open(g) as gal:
        assert require_upgrade(gal).online["decision"]["checks"] == d["checks"]
    finish_upgrade(g)  # the new model's answers take over here, not before
    with Gallery.open(g) as gal:
        kn, vn = gal.load_vectors(gal.primary_space)
        idsn = list(gal.ids_of(kn))
        s = open_searcher(gal)
        _, got, _ = s.search_paths(paths, K)
        assert got is not None
        assert [list(r) for r in got.ids] == _exact(q_new, idsn, vn, K)
