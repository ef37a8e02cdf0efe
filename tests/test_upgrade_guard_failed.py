"""The guard's last check of a run with items that cannot be re-embedded.

A failed item stays in the old part for good (``finish --force`` removes it), so
"the last item moved" never comes: the run must still check the gallery as it is
when nothing is left to move, or search follows a decision about an earlier
fraction until ``finish`` (auto serves the last check's rule, 100 % included).
Reference: the decision's ``moved`` equals the items in the new space after the
run. Seeded; tiny numpy models; a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import _tiny
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.job import run_upgrade, start_upgrade
from galleria.upgrade.online import OnlineConfig
from galleria.upgrade.state import require_upgrade

N = 48


def _broken(imgs: Path, n: int) -> None:
    """Make the last ``n`` images unreadable (after indexing: the new model fails)."""
    for p in sorted(imgs.glob("*.png"))[-n:]:
        p.write_bytes(b"not an image")


def test_a_model_run_with_failed_items_checks_the_gallery_it_leaves(tmp_path):
    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", N, 7)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    _broken(imgs, 2)
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2, dim=2), order="random",
                  calib_size=20, online=OnlineConfig(first_at=16, growth=4.0,
                                                     pseudo_queries=24, seed=0,
                                                     recheck_every=0.5))
    rep = run_upgrade(g, commit_every=8)
    assert len(rep.failed) == 2 and rep.remaining == 2
    with Gallery.open(g) as gal:
        st = require_upgrade(gal)
        moved = gal.count(st.new_space)
        assert moved == N - 2
        d = st.online["decision"]
        assert d["checked"] and d["moved"] == moved, d["moved"]
        checks = d["checks"]
    run_upgrade(g)  # nothing new to move (the failed items are skipped): no check again
    with Gallery.open(g) as gal:
        assert require_upgrade(gal).online["decision"]["checks"] == checks


def test_a_local_run_with_failed_items_checks_the_gallery_it_leaves(tmp_path):
    from galleria.extractors.registry import create_extractor
    from galleria.images.pseudo import clutter
    from galleria.upgrade.change import start_local
    from galleria.upgrade.local_guard import LocalGuardConfig

    n = 24
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        clutter((160, 160), rng, 60).save(imgs / f"{i:02d}.png")
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    _broken(imgs, 2)
    start_local(g, "sift", extractor=create_extractor("sift"), seed=0,
                guard=LocalGuardConfig(recheck_every=0.25))  # a check every 6 items
    rep = run_upgrade(g, batch_size=6, commit_every=6)
    assert len(rep.failed) == 2
    with Gallery.open(g) as gal:
        st = require_upgrade(gal)
        moved = gal.count(st.new_space)
        assert moved == n - 2
        d = st.online["decision"]
        assert d["checked"] and d["moved"] == moved, d["moved"]
        checks = d["checks"]
    run_upgrade(g)  # nothing new: no check again
    with Gallery.open(g) as gal:
        assert require_upgrade(gal).online["decision"]["checks"] == checks
